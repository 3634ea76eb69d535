"""Hugging Face parity with the real transformers classes, offline."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import ModernBertConfig, ModernBertDecoderConfig, ModernBertDecoderForCausalLM, ModernBertForMaskedLM

from ettin import hf
from ettin.config import load_config
from ettin.parallel import full_state_dict, init_process_groups, load_full_state_dict

# several shapes: (overrides) on top of the tiny experiment
SHAPES = {
    "tiny": [],
    "wide": ["model.hidden_size=96", "model.num_heads=3", "model.intermediate_size=160", "model.num_layers=5"],
    "window32_global2": ["model.num_layers=5", "model.global_every=2", "model.window_left=16", "model.window_right=16"],
}


@pytest.fixture(scope="module", autouse=True)
def process_group():
    init_process_groups(1)


def perturbed_state(cfg, seed=0):
    """A random model whose norms and biases are off their init too, so a wrong mapping shows."""
    torch.manual_seed(seed)
    state = full_state_dict(cfg.model.build())
    g = torch.Generator().manual_seed(seed + 1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def config_for(shape, objective):
    overrides = list(SHAPES[shape])
    if objective == "clm":
        overrides = [
            o.replace("model.window_left=16", "model.window_left=15").replace(
                "model.window_right=16", "model.window_right=0"
            )
            for o in overrides
        ]
    # transformers 4.57's decoder ignores local_rope_theta (see the last tests): equal thetas for decoders
    return load_config(
        "tiny",
        [
            f"objective={objective}",
            "model.local_rope_theta=5000" if objective == "mlm" else "model.global_rope_theta=20000",
            "model.local_rope_theta=20000",
            *overrides,
        ],
    )


def runs_in_subprocess(*args):
    return subprocess.run([sys.executable, "-m", "ettin.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_exported_weights_give_our_logits_in_transformers(tmp_path, shape, objective):
    cfg = config_for(shape, objective)
    hf.export(cfg.model, perturbed_state(cfg), tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == [hf.DECODER if objective == "clm" else hf.ENCODER]
    assert written["layer_types"] == hf.layer_types(cfg.model)
    result = hf.compare_with_transformers(tmp_path, lengths=(1, 7, 64, 129, 300))
    assert result["finite"]
    assert result["max_abs_logit"] > 0.5  # the comparison is not between near-zero numbers
    assert result["max_abs_diff"] < 1e-4, result


def test_transformers_loads_the_export_with_its_own_classes(tmp_path):
    cfg = config_for("tiny", "mlm")
    hf.export(cfg.model, perturbed_state(cfg), tmp_path)
    model = ModernBertForMaskedLM.from_pretrained(tmp_path)  # no custom code, no hub
    assert model.config.local_attention == 128 and model.config.global_attn_every_n_layers == 3
    assert model.decoder.weight.data_ptr() == model.model.embeddings.tok_embeddings.weight.data_ptr()  # tied


def test_an_mntp_checkpoint_exports_as_masked_lm_whose_logits_predict_the_next_token(tmp_path):
    """MNTP weights are a ModernBertForMaskedLM whose logits at i-1 predict the token masked at i;
    config.json says so (ettin_objective, ettin_label_shift), and our MNTP loss is exactly
    transformers' logits read that way."""
    import numpy as np

    from ettin.config import IGNORE
    from ettin.data.collate import Collator

    cfg = load_config("tiny", ["objective=mntp", "objective.mask_rate=0.3"])
    state = perturbed_state(cfg)
    hf.export(cfg.model, state, tmp_path, objective="mntp")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == [hf.ENCODER] and written["model_type"] == "modernbert"
    assert written["ettin_objective"] == "mntp" and written["ettin_label_shift"] == 1
    theirs = ModernBertForMaskedLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert theirs.config.ettin_label_shift == 1  # kept, and ignored by the model
    doc = np.array([1, *np.random.default_rng(0).integers(5, 512, 150), 2], dtype=np.uint32)
    mlm = Collator.from_config(load_config("tiny", ["objective.mask_rate=0.3"])).sample(doc, 9)
    inputs, labels = Collator.from_config(cfg).sample(doc, 9)
    masked = np.flatnonzero(mlm[1] != IGNORE)  # the positions i MLM would label
    assert np.array_equal(inputs, mlm[0]) and np.array_equal(np.flatnonzero(labels != IGNORE), masked - 1)
    with torch.no_grad():
        logits = theirs(input_ids=torch.from_numpy(inputs).long()[None]).logits[0]
        expected = torch.nn.functional.cross_entropy(logits[masked - 1], torch.from_numpy(doc[masked].astype(np.int64)))
        model = cfg.model.build(attn_backend="sdpa").eval()
        load_full_state_dict(model, state)
        ours = model(
            torch.from_numpy(inputs).long(),
            torch.tensor([0, len(doc)], dtype=torch.int32),
            labels=torch.from_numpy(labels).long(),
        )
    assert ours.item() == pytest.approx(expected.item(), abs=1e-4)


def test_the_objective_is_recorded_and_checked(tmp_path):
    from ettin.config import to_yaml

    for objective, shift in (("mlm", 0), ("clm", 1)):
        cfg = config_for("tiny", objective)
        hf.export(cfg.model, perturbed_state(cfg), tmp_path / objective, objective=objective)
        written = json.loads((tmp_path / objective / "config.json").read_text())
        assert (written["ettin_objective"], written["ettin_label_shift"]) == (objective, shift)
    cfg = config_for("tiny", "mlm")
    with pytest.raises(hf.ConversionError, match="does not match an encoder"):
        hf.export(cfg.model, perturbed_state(cfg), tmp_path / "x", objective="clm")
    with pytest.raises(hf.ConversionError, match="unknown objective"):
        hf.export(cfg.model, perturbed_state(cfg), tmp_path / "y", objective="mask")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    assert hf.checkpoint_objective(checkpoint) is None
    (checkpoint / "config.yaml").write_text(to_yaml(load_config("tiny", ["objective=mntp"])))
    assert hf.checkpoint_objective(checkpoint) == "mntp"


def test_a_decoder_export_generates_from_cls_and_stops_at_sep(tmp_path):
    cfg = config_for("tiny", "clm")
    hf.export(cfg.model, perturbed_state(cfg), tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    m = cfg.model
    assert written["eos_token_id"] == generation["eos_token_id"] == m.sep_token_id
    assert written["bos_token_id"] == generation["bos_token_id"] == m.cls_token_id
    assert generation["pad_token_id"] == m.pad_token_id
    assert hf.load_hf_model(tmp_path).generation_config.eos_token_id == m.sep_token_id


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_import_export_round_trip_is_exact(tmp_path, objective):
    cfg = config_for("wide", objective)
    state = perturbed_state(cfg)
    hf.export(cfg.model, state, tmp_path / "a")
    cfg2, state2 = hf.load_hf(tmp_path / "a")
    assert cfg2 == cfg.model.__class__(
        **{**cfg.model.__dict__, "attn_out_dropout": cfg2.attn_out_dropout, "mask_token_id": cfg2.mask_token_id}
    )
    assert state2.keys() == state.keys() and all(torch.equal(state2[k], state[k]) for k in state)
    hf.export(cfg2, state2, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_a_transformers_initialized_model_imports_with_the_same_logits(tmp_path, objective):
    torch.manual_seed(3)
    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=4,
        num_attention_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        local_attention=32,
        global_rope_theta=30000.0,
        initializer_range=0.1,
    )
    if objective == "mlm":
        model = ModernBertForMaskedLM(ModernBertConfig(**common, local_rope_theta=7000.0))
    else:
        model = ModernBertDecoderForCausalLM(ModernBertDecoderConfig(**common, local_rope_theta=30000.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    result = hf.compare_with_transformers(tmp_path, lengths=(3, 40, 200))
    assert result["finite"] and result["max_abs_diff"] < 1e-4, result


@pytest.mark.slow
def test_cli_export_import_check(tmp_path):
    exported, imported, again = tmp_path / "hf", tmp_path / "ours", tmp_path / "hf2"
    proc = runs_in_subprocess(
        "hf", "export", "--config", "tiny", "--init-seed", "5", "--out", str(exported), "objective=clm"
    )
    assert proc.returncode == 0, proc.stderr
    assert "ModernBertDecoderForCausalLM" in proc.stdout
    assert runs_in_subprocess("hf", "import", str(exported), "--out", str(imported)).returncode == 0
    assert runs_in_subprocess("hf", "export", "--checkpoint", str(imported), "--out", str(again)).returncode == 0
    a, b = load_file(exported / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    check = runs_in_subprocess("hf", "check", str(again))
    assert check.returncode == 0 and "-> OK" in check.stdout, check.stdout + check.stderr


@pytest.mark.slow
def test_check_fails_on_non_finite_logits(tmp_path):
    cfg = config_for("tiny", "mlm")
    state = perturbed_state(cfg)
    state["layers.2.wo.weight"][0, 0] = float("nan")
    hf.export(cfg.model, state, tmp_path)
    proc = runs_in_subprocess("hf", "check", str(tmp_path))
    assert proc.returncode == 1 and "NON-FINITE" in proc.stdout and "MISMATCH" in proc.stdout


@pytest.mark.slow
def test_check_measures_the_decoder_local_theta_gap_of_this_transformers(tmp_path):
    """Ettin's small decoders decay with local theta 10k and global 160k. transformers 4.57 gives
    the decoder's local layers the global theta; the export warns and `hf check` shows the gap."""
    cfg = load_config("tiny", ["objective=clm", "model.global_rope_theta=160000", "model.local_rope_theta=10000"])
    honoured = hf._decoder_honours_local_theta()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf.export(cfg.model, perturbed_state(cfg), tmp_path)
    assert any("local_rope_theta" in str(w.message) for w in caught) != honoured
    proc = runs_in_subprocess("hf", "check", str(tmp_path))
    assert (proc.returncode == 0) == honoured, proc.stdout


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(tmp_path):
    proc = runs_in_subprocess("hf", "check", str(tmp_path / "missing"))
    assert (
        proc.returncode == 2
        and proc.stderr.strip().startswith("error: ")
        and len(proc.stderr.strip().splitlines()) == 1
    )
    proc = runs_in_subprocess("hf", "export", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "exactly one of --checkpoint PATH or --config EXPERIMENT" in proc.stderr
    proc = runs_in_subprocess("hf", "export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "is not an ettin model folder" in proc.stderr
    proc = runs_in_subprocess(
        "hf", "export", "--config", "tiny", "--tokenizer", str(tmp_path / "nope.json"), "--out", str(tmp_path / "y")
    )
    assert proc.returncode == 2 and "tokenizer file" in proc.stderr


def test_export_checks_the_checkpoint_and_names_a_damaged_file(tmp_path, capsys):
    """An ettin model folder carries a manifest (hf import writes one). Weights under 64 MiB are
    hashed on every export (a flipped byte is named); --verify-all hashes larger ones too; a
    truncated file is one error line naming it even in an old folder without a manifest."""
    from ettin.cli import main

    cfg = config_for("tiny", "mlm")
    folder = hf.save_weights(tmp_path / "ours", cfg.model, perturbed_state(cfg))
    assert main(["hf", "export", "--checkpoint", str(folder), "--verify-all", "--out", str(tmp_path / "a")]) == 0
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["hf", "export", "--checkpoint", str(folder), "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == (
        f"error: {weights}: its content differs from the xxh3_128 digest in manifest.json "
        "(corrupted); restore it from a copy or start from an earlier checkpoint "
        "(`ettin checkpoint verify RUN` lists the sound ones)\n"
    )
    weights.write_bytes(bytes(data[: len(data) // 2]))
    (folder / "manifest.json").unlink()  # an old folder: still named, by safetensors' header check
    assert main(["hf", "export", "--checkpoint", str(folder), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {weights}: is damaged or truncated") and err.count("\n") == 1, err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_import_and_export_name_damaged_or_unwritable_paths(tmp_path, capsys):
    from ettin.cli import main

    cfg = config_for("tiny", "clm")
    exported = hf.export(cfg.model, perturbed_state(cfg), tmp_path / "hf")
    (exported / "config.json").write_text('{"model_type": ')
    assert main(["hf", "import", str(exported), "--out", str(tmp_path / "ours")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {exported / 'config.json'}: is not valid JSON")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["hf", "export", "--config", "tiny", "--out", str(blocker / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {blocker / 'out'} cannot be created (")
    assert main(["hf", "export", "--config", "tiny", "--tokenizer", str(blocker), "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.startswith(f"error: tokenizer file {blocker} cannot be read (")
