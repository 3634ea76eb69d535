"""``make demo``: the whole journey on one CPU machine in a few minutes, with nothing downloaded.

1. a corpus from text every Python install has: the standard library's sources ("code") and
   its reference documentation and module docstrings ("docs"), two sources of one mixture;
2. a BPE tokenizer trained on it, and MDS shards prepared from it;
3. the paired 17m-shaped encoder and decoder (smaller vocabulary) trained on 2 data-parallel
   ranks with torchrun, checkpointing along the way;
4. the validation loss of both models at each checkpoint, side by side (2% of each source is
   held out of training and scored before every checkpoint);
5. one checkpoint's batch replayed from the data and re-hashed against its ledger;
6. both models exported to Hugging Face format, then a fill-mask and a short generation
   through ``transformers``;
7. a summary table.
Every step is the command a user would type; they are printed as they run.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

VOCAB = 4096
SEQ_LEN = 256


def run(cmd: list[str], quiet: bool = False, lines: int = 12) -> str:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"demo: step failed with exit code {proc.returncode}: {' '.join(str(c) for c in cmd)}")
    if not quiet:
        shown = [line for line in proc.stdout.splitlines() if line.strip()]
        print("\n".join("  " + line for line in shown[-lines:]), flush=True)
    return proc.stdout


def build_corpus(out: Path) -> tuple[Path, Path]:
    """A folder of standard-library sources (one document per file) and a JSONL of its documentation."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = sorted(p for p in lib.glob("*.py") if p.stat().st_size < 200_000)
    code_dir = out / "corpus" / "code"
    code_dir.mkdir(parents=True)
    for p in code:
        shutil.copyfile(p, code_dir / p.name)
    docs = out / "corpus" / "docs.jsonl"
    with docs.open("w") as f:
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions strip it; docstrings still make a source
            topics = {}
        for name in sorted(topics):
            f.write(json.dumps({"id": f"topic:{name}", "text": topics[name]}) + "\n")
        for path in code:
            try:
                doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8", errors="replace")))
            except SyntaxError:
                doc = None
            if doc:
                f.write(json.dumps({"id": f"module:{path.stem}", "text": doc}) + "\n")
    return code_dir, docs


def experiment(out: Path, steps: int) -> Path:
    tokens = steps * 12 * 200  # ~200 real tokens per 256-token sample here
    path = out / "demo.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        # Written by `make demo`: a 17m-shaped model with a {VOCAB}-token vocabulary.
        defaults: {{model: 17m, objective: mlm, phase: pretrain}}
        model: {{vocab_size: {VOCAB}, pad_token_id: 0, cls_token_id: 1, sep_token_id: 2, mask_token_id: 3,
                 max_position_embeddings: {SEQ_LEN}}}
        phase: {{tokens: {tokens}, seq_len: {SEQ_LEN}, checkpoint_every_tokens: {tokens // 4}}}
        lr_schedule: {{warmup_tokens: {tokens // 10}}}
        batch: {{global_size: 12, micro_tokens: {6 * SEQ_LEN}, warmup_tokens: {tokens // 8 // 200 * SEQ_LEN}, warmup_start_size: 4,
                 warmup_stages: 3}}
        train: {{log_every: 50, peak_flops_per_device: 1e11}}  # ~2 CPU cores' fp32 peak: MFU here is rough
        data:
          root: {out / "data"}
          tokenizer: {out / "tokenizer.json"}
          cache_dir: {out / "cache"}
          workers: 1
          validation: 0.02  # 2% of each source held out: scored before every checkpoint
          sources:
            - {{name: code, path: code, weight: 2}}
            - {{name: docs, path: docs, weight: 1}}
        """)
    )
    return path


def show_models(out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    torch.manual_seed(0)
    fill = pipeline("fill-mask", model=str(out / "hf" / "encoder"), device="cpu")
    prompt = "def __init__(self, [MASK]):"
    guesses = fill(prompt, top_k=3)
    tok = AutoTokenizer.from_pretrained(out / "hf" / "decoder")
    model = AutoModelForCausalLM.from_pretrained(out / "hf" / "decoder").eval()
    ids = tok("[CLS]import os\n", return_tensors="pt", add_special_tokens=False).input_ids
    gen = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    text = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"\nfill-mask  {prompt!r} -> " + ", ".join(f"{g['token_str']!r} ({g['score']:.2f})" for g in guesses))
    print(f"generate   'import os\\n' -> {text!r}\n")
    return {"fill": guesses, "generated": text}


def summary(out: Path, replay_ok: bool, seconds: float) -> None:
    from ettin.layout import list_checkpoints
    from ettin.train.metrics import read_all_metrics, read_metrics

    print(
        f"{'model':<8} {'steps':>6} {'tokens':>9} {'loss start -> end':>18} {'val loss':>8} {'tokens/s':>9} {'checkpoints':>11}"
    )
    for objective in ("mlm", "clm"):
        rows = read_metrics(out / "runs" / objective)
        val = [r["eval/total/loss"] for r in read_all_metrics(out / "runs" / objective) if "eval/total/loss" in r]
        rate = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
        start = sum(r["loss"] for r in rows[:5]) / min(5, len(rows))
        end = sum(r["loss"] for r in rows[-5:]) / min(5, len(rows))
        name = "encoder" if objective == "mlm" else "decoder"
        print(
            f"{name:<8} {rows[-1]['step']:>6} {rows[-1]['tokens']:>9,} {start:>8.3f} -> {end:<7.3f} {val[-1]:>8.3f} {rate:>9,.0f} "
            f"{len(list_checkpoints(out / 'runs' / objective)):>11}"
        )
    print(
        f"replay of a checkpoint's batch: {'OK (hash matches the ledger)' if replay_ok else 'MISMATCH'}; "
        f"total {seconds / 60:.1f} min"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ettin.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out", help="working folder (recreated; default demo_out)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per model (default 200)")
    args = p.parse_args(argv)
    started = time.time()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    bin_dir = Path(sys.executable).parent
    ettin = [sys.executable, "-m", "ettin.cli"]
    data = [*ettin, "data"]  # ettin data prepare|train-tokenizer; python -m data_tools is the same

    # each command on as few lines as one would type it
    # fmt: off
    print("== 1-2. corpus, tokenizer, MDS shards", flush=True)
    code, docs = build_corpus(out)
    tokenizer = out / "tokenizer.json"
    run([*data, "train-tokenizer", docs, "--plain-text", code, "--vocab-size", VOCAB, "--out", tokenizer, "-q"])
    run([*data, "prepare", "--plain-text", code, "--out", out / "data" / "code", "--tokenizer", tokenizer,
         "--seq-len", SEQ_LEN, "--workers", 2, "--quiet"])
    run([*data, "prepare", docs, "--out", out / "data" / "docs", "--tokenizer", tokenizer,
         "--seq-len", SEQ_LEN, "--quiet"])
    exp = experiment(out, args.steps)

    print("== 3. train the paired models on 2 data-parallel ranks", flush=True)
    for objective in ("mlm", "clm"):
        run([bin_dir / "torchrun", "--standalone", "--nproc_per_node", 2, "-m", "ettin.cli", "train", exp,
             f"objective={objective}", f"run_dir={out / 'runs' / objective}"])

    print("== 4. validation loss of the paired models at each checkpoint (held-out 2% of each source)", flush=True)
    run([*ettin, "eval", "--compare", out / "runs" / "mlm", out / "runs" / "clm"], lines=100)

    print("== 5. replay a checkpoint's batch from the data alone", flush=True)
    from ettin.layout import LEDGER_FILE, list_checkpoints

    ckpt = list_checkpoints(out / "runs" / "mlm")[1]
    step = json.loads((ckpt / LEDGER_FILE).read_text())["steps"][-1]["step"]
    replayed = run([*ettin, "replay", ckpt, "--step", step])
    replay_ok = "-> MATCH" in replayed

    print("== 6. export to Hugging Face and use the models through transformers", flush=True)
    for objective, name in (("mlm", "encoder"), ("clm", "decoder")):
        last = list_checkpoints(out / "runs" / objective)[-1]
        run([*ettin, "hf", "export", "--checkpoint", last, "--tokenizer", tokenizer, "--out", out / "hf" / name])
        run([*ettin, "hf", "check", out / "hf" / name])
    # fmt: on
    show_models(out)
    summary(out, replay_ok, time.time() - started)
    return 0 if replay_ok else 1


if __name__ == "__main__":
    sys.exit(main())
