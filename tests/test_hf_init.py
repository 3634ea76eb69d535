"""Phases that start from Hugging Face folders written by transformers' own classes (issue #15).

One working folder serves every test: a small corpus, a byte-level BPE tokenizer, a random
ModernBertForMaskedLM (RoPE θ 160k, as after Ettin's decay) and a random
ModernBertDecoderForCausalLM (1,024 positions, θ 10k, as after Ettin's pretrain), each
``save_pretrained`` with the tokenizer, and the corpus prepared by the README's own command.
The README journey ("Continue pretraining a released Ettin model on your corpus") is read from
README.md and run as written, with two substitutions for this machine (``ettin`` runs
``ettin.cli.main`` in this process, ``ettin data prepare`` as ``python -m ettin.cli`` in its own;
``torchrun --nproc_per_node N`` is one ``python`` process) and the
overrides in ``TINY`` appended to the commands that take a config (a tiny phase on CPU), plus
``model=from_checkpoint`` for ``ettin plan``, whose ``--sizes 150m`` names the released model
the folder stands in for.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ettin.config import ConfigError, load_config

# every test shares the `work` folder, whose making (a prepare in a subprocess, two saved models) takes
# tens of seconds, and most then train in a subprocess
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENCODER_DIR, DECODER_DIR = "hf/ettin-encoder-150m", "hf/ettin-decoder-1k"  # stand-ins, relative to the work folder
VOCAB = 320  # the embedding rows; the tokenizer may hold fewer (padded, as Ettin's 50,368)
# a tiny phase on two busy cores: ~4 steps of 8 documents, two checkpoints, exact fp32 losses
TINY = [
    "phase.tokens=2400",
    "phase.checkpoint_every_tokens=1200",
    "batch.global_size=8",
    "batch.micro_tokens=100000",
    "data.workers=0",
    "data.cache_dir=cache",
    "model.attn_out_dropout=0",
    "train.log_every=1",
    "train.collective_timeout_s=120",
]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
}


def readme_journey() -> tuple[str, list[list[str]]]:
    """The README section's bio.yaml and its commands, as written."""
    text = (
        (ROOT / "README.md").read_text().split("### Continue pretraining a released Ettin model on your corpus", 1)[1]
    )
    yaml_block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    bash_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return yaml_block, [shlex.split(line) for line in bash_block.splitlines() if line.strip()]


def runnable(command: list[str]) -> list[str]:
    """A README command that needs its own process, as this machine runs it (module doc)."""
    if command[0] == "torchrun":
        assert command[1] == "--nproc_per_node", command
        return [sys.executable, *command[3:]]
    if command[0] == "ettin":
        return [sys.executable, "-m", "ettin.cli", *command[1:]]
    assert command[0] == "python", command
    return [sys.executable, *command[1:]]


def run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def ettin(argv: list[str], capsys) -> str:
    """An ``ettin`` command other than train, in this process (no start-up cost); its stdout."""
    from ettin.cli import main

    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    return out.out


def train_cli(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "ettin.cli", "train", "bio.yaml", *TINY, *overrides]


def first_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if r["step"] == 1)  # step 0's loss, before the first update


def small_model(kind: str, seed: int):
    """A random transformers model with perturbed norms and biases, so that every weight matters."""
    from transformers import (
        ModernBertConfig,
        ModernBertDecoderConfig,
        ModernBertDecoderForCausalLM,
        ModernBertForMaskedLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        local_attention=32,
        initializer_range=0.1,
    )
    if kind == "encoder":  # as a released model after the decay phase
        model = ModernBertForMaskedLM(
            ModernBertConfig(
                **common, max_position_embeddings=7999, global_rope_theta=160000.0, local_rope_theta=160000.0
            )
        )
    else:  # as after the pretrain phase: 1,024 positions, θ 10k
        model = ModernBertDecoderForCausalLM(
            ModernBertDecoderConfig(
                **common, max_position_embeddings=1024, global_rope_theta=10000.0, local_rope_theta=10000.0
            )
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from ettin import hf
    from ettin.config import ModelConfig
    from ettin.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("hf_init")
    rng = torch.Generator().manual_seed(0)
    words = [
        "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(n),), generator=rng))
        for n in torch.randint(2, 9, (150,), generator=rng)
    ]
    docs = [
        " ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=rng))
        for n in torch.randint(15, 60, (90,), generator=rng)
    ]
    (root / "corpus" / "pubmed").mkdir(parents=True)
    (root / "corpus" / "pubmed" / "part-0.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_bpe(docs, VOCAB - 20).save(str(root / "tokenizer.json"))
    ids = ModelConfig(vocab_size=VOCAB, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    for kind, folder in (("encoder", ENCODER_DIR), ("decoder", DECODER_DIR)):
        small_model(kind, seed=len(kind)).save_pretrained(root / folder)
        hf.save_tokenizer(str(root / "tokenizer.json"), ids, root / folder)
    yaml_block, commands = readme_journey()
    (root / "bio.yaml").write_text(yaml_block)
    assert commands[0][:3] == ["ettin", "data", "prepare"], commands[0]
    ok(run(runnable(commands[0]), root))  # prepare, with the model folder's tokenizer
    return {"root": root, "commands": commands}


def step0_reference(cfg, folder: Path, **changes) -> float:
    """transformers' loss on the run's step-0 batch (same labels, same masks), built by our loader;
    ``changes`` replace config.json fields (what the phase changed, e.g. RoPE θ)."""
    from transformers import AutoConfig, ModernBertDecoderForCausalLM, ModernBertForMaskedLM

    from ettin.config import IGNORE
    from ettin.data.loader import DataPipeline, RankSteps

    _, batch = RankSteps(DataPipeline.from_config(cfg))[0]
    bounds = batch.bounds
    rows, width = len(bounds) - 1, max(b - a for a, b in zip(bounds, bounds[1:]))
    ids = torch.full((rows, width), cfg.model.pad_token_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE)
    for row, (a, b) in enumerate(zip(bounds, bounds[1:])):
        ids[row, : b - a], mask[row, : b - a] = batch.input_ids[a:b], 1
        ours = batch.labels[a:b].long()
        if cfg.model.causal:  # transformers shifts: its label at i + 1 is ours at i
            labels[row, 1 : b - a] = ours[:-1]
        else:
            labels[row, : b - a] = ours
    config = AutoConfig.from_pretrained(folder)
    for key, value in changes.items():
        setattr(config, key, value)
    cls = ModernBertDecoderForCausalLM if cfg.model.causal else ModernBertForMaskedLM
    model = cls.from_pretrained(folder, config=config, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def test_the_readme_journey_starts_from_an_encoder_folder_trains_exports_and_checks(work, monkeypatch, capsys):
    root, commands = work["root"], work["commands"]
    monkeypatch.chdir(root)
    plan, train, export, check = commands[1:]
    assert plan[:2] == ["ettin", "plan"] and "train" in train and export[:3] == ["ettin", "hf", "export"]
    table = ettin(plan[1:] + ["model=from_checkpoint"], capsys)
    assert re.search(r"^150m\s+mlm\s+decay\s+2B\s+7999\s+4608\s+55\b", table, re.M), table

    out = ok(run(runnable(train) + TINY, root))
    assert f"starting from Hugging Face folder {ENCODER_DIR} (ModernBertForMaskedLM" in out, out
    cfg = load_config("bio.yaml", TINY)
    assert cfg.model.hidden_size == 64 and cfg.model.window_left == 16 and cfg.model.mask_token_id == 3
    reference = step0_reference(cfg, root / ENCODER_DIR)
    assert first_loss(root / cfg.run_dir) == pytest.approx(reference, rel=1e-5)
    state = json.loads(sorted((root / cfg.run_dir / "checkpoints").iterdir())[-1].joinpath("state.json").read_text())
    assert (
        state["final"] and state["step"] >= 2 and state["optimizer_step"] == state["step"]
    )  # fresh optimizer, clock reset

    ettin(export[1:], capsys)
    assert "OK" in ettin(check[1:], capsys)
    exported = root / export[export.index("--out") + 1]
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["ModernBertForMaskedLM"] and config["vocab_size"] == VOCAB
    assert (exported / "tokenizer.json").read_bytes() == (root / ENCODER_DIR / "tokenizer.json").read_bytes()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(exported).mask_token_id == 3


@pytest.fixture(scope="module")
def decoder_run(work):
    """The extension phase (7,999 tokens, θ 160k) from the 1,024-token decoder folder, TP=1."""
    root = work["root"]
    out = ok(
        run(
            train_cli(
                "objective=clm",
                "phase=extension",
                f"phase.init_checkpoint={DECODER_DIR}",
                "run_dir=runs/decoder-extension",
            ),
            root,
        )
    )
    return {"root": root, "run": root / "runs/decoder-extension", "stdout": out}


def test_a_decoder_folder_starts_the_extension_phase_with_transformers_step0_loss(decoder_run, monkeypatch, capsys):
    root = decoder_run["root"]
    monkeypatch.chdir(root)
    assert f"starting from Hugging Face folder {DECODER_DIR} (ModernBertDecoderForCausalLM" in decoder_run["stdout"]
    cfg = load_config("bio.yaml", ["objective=clm", "phase=extension", f"phase.init_checkpoint={DECODER_DIR}", *TINY])
    # window: the folder's as transformers reads it (its decoder config keeps no local_attention, so a
    # reload has sliding_window 64 whatever was saved: j > i - 64, our window_left 63)
    assert (
        cfg.model.causal,
        cfg.model.window_left,
        cfg.model.global_rope_theta,
        cfg.model.max_position_embeddings,
    ) == (True, 63, 160000.0, 7999)
    # the same weights under the phase's RoPE θ: what the run trains
    reference = step0_reference(cfg, root / DECODER_DIR, global_rope_theta=160000.0, local_rope_theta=160000.0)
    assert first_loss(decoder_run["run"]) == pytest.approx(reference, rel=1e-5)
    # long context: the export carries the phase's θ and position limit, and transformers agrees with it
    ettin(
        [
            "hf",
            "export",
            "--checkpoint",
            str(decoder_run["run"]),
            "--tokenizer",
            DECODER_DIR,
            "--out",
            "hf/decoder-extension",
        ],
        capsys,
    )
    config = json.loads((root / "hf/decoder-extension/config.json").read_text())
    assert (config["global_rope_theta"], config["local_rope_theta"], config["max_position_embeddings"]) == (
        160000.0,
        160000.0,
        7999,
    )
    assert "OK" in ettin(["hf", "check", "hf/decoder-extension"], capsys)


@pytest.mark.distributed
def test_tensor_parallel_two_starts_from_the_same_folder_with_the_same_step0_loss(decoder_run):
    root = decoder_run["root"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *train_cli(
            "objective=clm",
            "phase=extension",
            f"phase.init_checkpoint={DECODER_DIR}",
            "run_dir=runs/decoder-tp2",
            "parallel.tensor=2",
            "train.max_steps=1",
        )[1:],
    ]
    ok(run(command, root))
    assert first_loss(root / "runs/decoder-tp2") == pytest.approx(first_loss(decoder_run["run"]), rel=1e-5)


def test_data_from_another_tokenizer_is_refused_in_one_line(work):
    from ettin.testing import synthetic_corpus, write_mds_source

    root = work["root"]
    vocab = json.loads((root / "data/pubmed/stats.json").read_text())["tokenizer"]["vocab_size"]
    write_mds_source(
        root / "data/other",
        synthetic_corpus(40, vocab, 1, cls_id=4),
        stats={"tokenizer": {"sha256": "another", "vocab_size": vocab - 1}, "cls_id": 4, "sep_id": 2},
    )
    proc = run(train_cli("run_dir=runs/other", "data.sources=[{name: other, path: other}]"), root)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout + proc.stderr
    assert "the data's tokenizer" in errors[0] and f"vocab {vocab - 1}" in errors[0] and "[CLS]=4" in errors[0]
    assert f"vocab {vocab}" in errors[0] and "[CLS]=1" in errors[0] and ENCODER_DIR in errors[0], errors[0]
    assert not (root / "runs/other/checkpoints").exists()


def test_a_preset_that_disagrees_with_the_folder_is_refused_one_line_per_difference(work, monkeypatch, capsys):
    from ettin.cli import main

    monkeypatch.chdir(work["root"])
    differing = {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "window_left",
        "window_right",
        "cls_token_id",
        "sep_token_id",
        "pad_token_id",
        "mask_token_id",
    }  # 17m vs the folder
    with pytest.raises(ConfigError) as e:
        load_config("bio.yaml", ["model=17m"])
    lines = str(e.value).splitlines()
    assert {
        re.match(r"model\.(\w+): model=17m gives \S+ but hf/ettin-encoder-150m/config\.json has \S+; ", line).group(1)
        for line in lines
    } == differing and len(lines) == len(differing), lines
    # an override with the checkpoint's value settles its line; the CLI prints one error line each
    assert main(["config", "show", "bio.yaml", "model=17m", "model.hidden_size=64"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(differing) - 1 and not any("hidden_size" in line for line in errors), errors
    # the phase's own settings are no disagreement: pretrain's θ wins over the folder's 160k
    cfg = load_config("bio.yaml", ["phase=pretrain", "phase.init=pretrained"])
    assert cfg.model.global_rope_theta == 10000.0 and cfg.model.hidden_size == 64


def test_the_objective_must_fit_the_folder_unless_the_phase_crosses(work, monkeypatch):
    monkeypatch.chdir(work["root"])
    with pytest.raises(
        ConfigError,
        match=r"^phase.init_checkpoint=hf/ettin-encoder-150m is an encoder and objective clm "
        r"trains a decoder: that is the cross direction, allowed only with "
        r"phase.init=other_objective \(phase=cross\)[^\n]*$",
    ):
        load_config("bio.yaml", ["objective=clm"])
    cfg = load_config(
        "bio.yaml", ["objective=clm", "phase=cross", "phase.tokens=50e9"]
    )  # encoder -> decoder: the objective's attention
    assert (
        cfg.model.causal and cfg.model.window_left == 63 and cfg.model.window_right == 0 and cfg.model.hidden_size == 64
    )


def test_how_a_phase_asks_for_a_checkpoint_is_validated(work, monkeypatch):
    monkeypatch.chdir(work["root"])
    with pytest.raises(ConfigError, match=r"phase.init=scratch ignores phase.init_checkpoint .*phase.init=pretrained"):
        load_config("bio.yaml", ["phase=pretrain", "model=17m"])
    with pytest.raises(ConfigError, match=r"phase.init=pretrained needs phase.init_checkpoint"):
        load_config("bio.yaml", ["phase=pretrain", "model=17m", "phase.init=pretrained", "phase.init_checkpoint=null"])
    with pytest.raises(ConfigError, match=r"model=from_checkpoint needs phase.init_checkpoint"):
        load_config("bio.yaml", ["phase.init_checkpoint=runs/not-yet"])
