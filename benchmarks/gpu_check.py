"""The GPU acceptance run: one command, one markdown table (``make gpu-check OUT=dir``).

    python benchmarks/gpu_check.py --out DIR            # one H100/H200: under 8 minutes
    python benchmarks/gpu_check.py --out DIR --smoke    # anywhere (CI runs it on the CPU): tiny shapes

Sections, each in its own process with its own time limit, so a crash, a hang or a missing
package costs one line of the report and never the rest:

1. ``attention``: every available backend against the fp64 reference, outputs and gradients, for
   the four mask variants (encoder/decoder x global/local).
2. ``trainer``: the real trainer (DeepSpeed bf16 with fp32 gradient accumulation, the loader, the
   token-budget micro-batches) on synthetic MDS shards, with ``train.sync_debug`` counting the
   host syncs of every step; DeepSpeed's skipped steps; then the same run stopped halfway and
   resumed from its checkpoint, which must end bit-equal to the uninterrupted one.
3. ``throughput``: tokens/s, MFU and peak memory of one train step (forward, backward, AdamW) at
   the default micro budget, for 150m at 1,024 and for 400m and 1b at 1,024 and 7,999, with every
   backend and with transformers' class on the same documents. FLOPs are ``ettin.flops.step_flops``
   (real document lengths and windows, the head on labelled tokens only); MFU is against the
   datasheet dense bf16 peak by device name, and the measured matmul peak is printed beside it.

Writes ``DIR/gpu-check.md`` (and each section's rows as JSON) and prints the table. Exit 0 when
every section ran and passed its checks, 1 otherwise. Needs, besides torch and this repository:
megatron-core (all sections), transformers (throughput), deepspeed and mosaicml-streaming
(trainer); a missing one fails that section with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("attention", "trainer", "throughput")
LIMITS_S = {"attention": 90, "trainer": 180, "throughput": 210}  # 8 minutes in all; --smoke: the same ceilings
TINY = [
    "model.vocab_size=512",
    "model.hidden_size=64",
    "model.intermediate_size=96",
    "model.num_heads=2",
    "model.num_layers=3",
    "model.pad_token_id=0",
    "model.cls_token_id=1",
    "model.sep_token_id=2",
    "model.mask_token_id=3",
]


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- 1. attention


def section_attention(smoke: bool, work: Path):
    import torch

    from ettin.attention import available_backends, reference_check
    from ettin.parallel import init_process_groups

    init_process_groups(1)
    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in available_backends():
        for row in reference_check(name, device, dtype):
            yield {"backend": name, **row}


# ----------------------------------------------------------------------------- 2. trainer


def _trainer_experiment(smoke: bool, work: Path) -> Path:
    from ettin.testing import synthetic_corpus, write_mds_source

    seq, vocab = (128, 512) if smoke else (1024, 50368)
    data = work / ("data-smoke" if smoke else "data")
    if not data.exists():
        samples = synthetic_corpus(400 if smoke else 4000, vocab, 1, seq // 4, seq - 2, cls_id=1, sep_id=2)
        write_mds_source(
            data / "a", samples, size_limit=1 << 22, stats={"tokenizer": {"sha256": "synthetic", "vocab_size": vocab}}
        )
    model = (
        "\n".join(f"  {o.split('=')[0].split('.')[1]}: {o.split('=')[1]}" for o in TINY)
        if smoke
        else ("  pad_token_id: 0\n  cls_token_id: 1\n  sep_token_id: 2\n  mask_token_id: 3")
    )
    exp = work / "exp.yaml"
    exp.write_text(f"""defaults: {{model: {"17m" if smoke else "150m"}, objective: mlm, phase: pretrain}}
model:
{model}
phase: {{tokens: 1e12, seq_len: {seq}, checkpoint_every_tokens: 1e12}}
lr_schedule: {{warmup_tokens: 0}}
batch: {{global_size: {16 if smoke else 64}, micro_tokens: {512 if smoke else 16384}, warmup_tokens: 0}}
train: {{log_every: 1, sync_debug: true, deterministic: true, grad_accum_dtype: fp32, collective_timeout_s: 120}}
data:
  root: {data}
  cache_dir: {work / "cache"}
  workers: 1
  sources: [{{name: a, path: a}}]
""")
    return exp


def _train(exp: Path, run_dir: Path, steps: int, deadline: float) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    code = "import sys; from ettin.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", str(exp), f"run_dir={run_dir}", f"train.max_steps={steps}"],
        capture_output=True,
        text=True,
        timeout=max(1.0, deadline - time.time()),
        env=env,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"ettin train exited {proc.returncode}: {tail}")


def section_trainer(smoke: bool, work: Path):
    from safetensors.torch import load_file

    from ettin.layout import list_checkpoints
    from ettin.train.metrics import read_metrics

    exp, steps, deadline = _trainer_experiment(smoke, work), 4, time.time() + LIMITS_S["trainer"] - 10
    straight, resumed = work / "straight", work / "resumed"
    for run in (straight, resumed):  # runs of an earlier gpu-check into the same folder would resume
        shutil.rmtree(run, ignore_errors=True)
    _train(exp, straight, steps, deadline)
    for r in read_metrics(straight):
        yield {
            "check": f"step {r['step']}",
            "loss": round(r["loss"], 4),
            "grad_norm": round(r["grad_norm"], 4),
            "host_syncs": r.get("host_syncs"),
            "sync_calls": r.get("sync_calls"),
            "skipped_steps": r.get("skipped_steps"),
            "sync_sites": " ".join(Path(s).name for s in r.get("host_sync_sites", [])[:4]),
            "ok": r["loss"] == r["loss"] and r.get("skipped_steps", 0) == 0,
        }
    _train(exp, resumed, steps // 2, deadline)
    _train(exp, resumed, steps, deadline)
    a, b = list_checkpoints(straight)[-1], list_checkpoints(resumed)[-1]
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        equal = ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)
        worst = max(((ta[k].float() - tb[k].float()).abs().max().item() for k in ta if k in tb), default=float("nan"))
        yield {"check": f"resume bit-equal: {name}", "max_abs_diff": worst, "ok": equal}
    losses = [r["loss"] for r in read_metrics(straight)], [r["loss"] for r in read_metrics(resumed)]
    yield {
        "check": "resume: the same losses",
        "straight": [round(x, 6) for x in losses[0]],
        "resumed": [round(x, 6) for x in losses[1]],
        "ok": losses[0] == losses[1],
    }


# ----------------------------------------------------------------------------- 3. throughput


def _matmul_peak(device) -> float:
    import torch

    if device.type != "cuda":
        return float("nan")
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 20 / (time.perf_counter() - start)


def _timed(step, device, repeats: int) -> float:
    import torch

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def section_throughput(smoke: bool, work: Path):
    import torch

    from ettin.config import load_config
    from ettin.flops import resolve_peak_flops
    from ettin.parallel import init_process_groups

    init_process_groups(1)
    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, measured = resolve_peak_flops(load_config("ettin"), name), _matmul_peak(device)
    yield {
        "impl": "peaks",
        "datasheet_tflops": peak / 1e12,
        "measured_matmul_tflops": measured / 1e12,
        "device": name,
        "ok": True,
    }
    # a model is built once per size and objective (megatron initializes on the CPU: slow at 1b)
    cases = {"17m": [128]} if smoke else {"150m": [1024], "400m": [1024, 7999], "1b": [1024, 7999]}
    for size, lengths in cases.items():
        for objective in ("mlm", "clm"):
            yield from _throughput(size, objective, lengths, smoke, device, dtype, peak, measured)


def _throughput(size, objective, lengths, smoke, device, dtype, peak, measured):
    import numpy as np
    import torch
    from transformers import ModernBertDecoderForCausalLM, ModernBertForMaskedLM

    from ettin.attention import Documents, available_backends, build_attention
    from ettin.config import IGNORE, load_config
    from ettin.flops import step_flops
    from ettin.hf import hf_config
    from ettin.memory import default_micro_tokens

    cfg = load_config(
        "ettin", [f"model={size}", f"objective={objective}", "model.attn_out_dropout=0.0", *(TINY if smoke else [])]
    )
    m = cfg.model
    torch.manual_seed(0)
    ours = m.build(attn_backend="sdpa").to(device, dtype)
    hf_config_ = hf_config(m)
    hf_config_._attn_implementation = "sdpa"
    with torch.device(device):  # initialized where it runs: fast, even at 1b
        hf = (ModernBertForMaskedLM if objective == "mlm" else ModernBertDecoderForCausalLM)(hf_config_).to(dtype)
    # FlexAttention has no backward on the CPU
    impls = {f"ours/{b}": b for b in available_backends() if b != "flex" or device.type == "cuda"}
    impls["hf/sdpa"] = None
    for seq in lengths:
        phase = "pretrain" if seq == 1024 or smoke else "extension"
        budget = (
            512
            if smoke
            else default_micro_tokens(
                load_config("ettin", [f"model={size}", f"objective={objective}", f"phase={phase}"]), dp=1
            )
        )
        docs = max(1, budget // seq)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, m.vocab_size, (docs * seq,), generator=g)
        cu = torch.arange(docs + 1, dtype=torch.int32) * seq
        if objective == "mlm":
            labels = torch.where(torch.rand(ids.shape, generator=g) < (0.3 if seq == 1024 else 0.15), ids, IGNORE)
        else:
            labels = torch.roll(ids, -1)
            labels[cu[1:].long() - 1] = IGNORE
        index = torch.nonzero(labels != IGNORE).squeeze(1)
        flops = step_flops(m, np.full(docs, seq), len(index))
        ids_d, labels_d, index_d = ids.to(device), labels.to(device), index.to(device)
        batch = Documents(cu.to(device), tuple(cu.tolist()), seq)
        for impl, backend in impls.items():
            row = {"size": size, "seq": seq, "model": objective, "impl": impl, "micro_tokens": docs * seq}
            try:
                if backend is not None:
                    ours.attend = build_attention(backend)
                    model, forward = ours, (lambda: ours(ids_d, batch, labels=labels_d, label_index=index_d))
                else:
                    hf_ids = ids_d.view(docs, seq)
                    hf_labels = (labels_d if objective == "mlm" else ids_d).view(docs, seq)
                    model, forward = hf, (lambda: hf(input_ids=hf_ids, labels=hf_labels).loss)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

                def step(forward=forward, opt=opt):
                    forward().backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds = _timed(step, device, 1 if smoke else 3)
                row.update(
                    tokens_per_s=round(docs * seq / seconds),
                    mfu=flops / seconds / peak,
                    mfu_vs_measured_peak=flops / seconds / measured,
                    peak_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                    ok=True,
                )
                del opt
            except torch.OutOfMemoryError:
                row.update(error="out of memory", ok=False)
            except Exception as e:  # noqa: BLE001 - one line per failed case, the table goes on
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", ok=False)
            yield row
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- running and reporting


def run_section(name: str, smoke: bool, work: Path) -> None:
    """Child process: run one section, appending each row to a JSONL file as soon as it exists
    (a section killed for time still reports what it measured), and its error as the last line."""
    with open(work / f"{name}.jsonl", "w") as out:
        try:
            for row in globals()[f"section_{name}"](smoke, work):
                out.write(json.dumps(row, default=str) + "\n")
                out.flush()
        except Exception as e:  # noqa: BLE001 - the parent turns it into the section's one line
            traceback.print_exc()
            out.write(json.dumps({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}) + "\n")


def read_section(path: Path) -> dict:
    """{"rows": [...]} plus "error" when the section failed, from its JSONL file."""
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    result = {"rows": [r for r in lines if "error" not in r or "ok" in r]}
    errors = [r["error"] for r in lines if "error" in r and "ok" not in r]
    return result | ({"error": errors[-1]} if errors else {})


def markdown(name: str, result: dict) -> str:
    """The section's rows as markdown tables (consecutive rows with the same columns share one),
    then its error line if it failed."""
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = [f"### {name}"]
    keys = None
    for row in result["rows"]:
        if list(row) != keys:
            keys = list(row)
            lines += ["", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
        lines.append("| " + " | ".join(cell(row[k]) for k in keys) + " |")
    if "error" in result:
        lines += ["", f"FAILED: {result['error']}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--out", required=True, help="folder for gpu-check.md and the sections' JSON")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, CPU allowed: checks the script itself")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.section:
        run_section(args.section, args.smoke, out / "work")
        return 0
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("error: no CUDA device here; run with --smoke to check the script on the CPU", file=sys.stderr)
        return 2
    (out / "work").mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    report, failed = (
        [
            f"# gpu-check {'(smoke, CPU shapes) ' if args.smoke else ''}{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        ],
        [],
    )
    for name in args.sections.split(","):
        if name not in SECTIONS:
            print(f"error: unknown section '{name}' (known: {', '.join(SECTIONS)})", file=sys.stderr)
            return 2
        start, result_file = time.time(), out / "work" / f"{name}.jsonl"
        result_file.unlink(missing_ok=True)
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--out", str(out), "--section", name] + (["--smoke"] if args.smoke else []),
                capture_output=True,
                text=True,
                timeout=LIMITS_S[name],
                env=env,
            )
            (out / "work" / f"{name}.log").write_text(proc.stdout + proc.stderr)
            result = read_section(result_file)
            if proc.returncode != 0 and "error" not in result:
                result["error"] = f"exited {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"
        except subprocess.TimeoutExpired:
            result = read_section(result_file) | {
                "error": f"did not finish in {LIMITS_S[name]} s (killed; rows so far above)"
            }
        if "error" in result or not result["rows"] or not all(r.get("ok", True) for r in result["rows"]):
            failed.append(name)
        report.append(markdown(f"{name} ({time.time() - start:.0f} s)", result))
        print(report[-1], flush=True)
    (out / "gpu-check.md").write_text("\n".join(report))
    print(f"wrote {out / 'gpu-check.md'}; " + (f"FAILED: {', '.join(failed)}" if failed else "all sections passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
