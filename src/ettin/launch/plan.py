"""``ettin plan``: what each run of the recipe costs before anything is submitted.

Per size, objective and phase: planned tokens, optimizer steps (the batch-size warmup included),
checkpoints, and GPU-hours / days from a per-GPU throughput. The default throughput is the one
docs/RECIPE.md's published timings imply (4 x H100, wall-clock hours for 2T tokens); give your own
with ``--tokens-per-gpu-s`` or measure it from a run with ``--from-run``. The figure is scaled to
each phase's sequence length by the training FLOPs per token (long sequences cost more
attention per token; the head runs on the labelled tokens). Steps assume a sample holds about
``seq_len`` tokens: samples are document chunks and often shorter, so a real run takes more steps
than this estimate. ``--memory`` prints the predicted peak GPU memory of each run instead
(ettin.memory): the micro-batch budget, the breakdown, and whether it fits. ``--ramp`` prints the
batch-size warmup of each size and phase that has one: per stage its batch size, steps and tokens.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from ettin.config import ConfigError, load_config
from ettin.errors import run_alone
from ettin.layout import CONFIG_FILE

# docs/RECIPE.md "Published timings": 4 x H100 per model, wall-clock hours for 2T tokens
PUBLISHED_HOURS_2T = {"17m": 141, "32m": 212, "68m": 300, "150m": 470, "400m": 950, "1b": 2170}
PUBLISHED_GPUS = 4
PUBLISHED_SEQ_LEN = 1024  # most of those 2T tokens were pretraining at 1024


def published_tokens_per_gpu_s(size: str) -> float:
    """17m: 2e12 / (141 h * 3600 * 4) = 985k tokens/s per GPU, and so on."""
    return 2e12 / (PUBLISHED_HOURS_2T[size] * 3600 * PUBLISHED_GPUS)


@dataclass
class PlanRow:
    size: str
    objective: str
    phase: str
    tokens: int
    seq_len: int
    global_batch: int
    steps: int
    warmup_steps: int  # steps of the batch-size ramp
    checkpoints: int
    tokens_per_gpu_s: float  # at this phase's sequence length
    gpu_hours: float
    days: float  # wall-clock on `gpus` GPUs


def estimate(cfg, gpus: int, tokens_per_gpu_s_at_1024: float) -> dict:
    """Steps, checkpoints and time of one run's config."""
    from ettin.data.schedule import BatchSchedule
    from ettin.flops import flops_per_token, label_fraction

    tokens, seq_len = cfg.phase.tokens, cfg.phase.seq_len
    schedule = BatchSchedule.from_config(cfg)
    samples = math.ceil(tokens / seq_len)  # a sample is about seq_len tokens (an estimate; see the module doc)
    steps = schedule.step_at(samples - 1) + 1
    warmup_steps = _first_full_step(schedule)
    scale = _reference_flops(cfg) / flops_per_token(cfg.model, seq_len, label_fraction=label_fraction(cfg))["total"]
    rate = tokens_per_gpu_s_at_1024 * scale
    gpu_hours = tokens / rate / 3600
    return {
        "tokens": tokens,
        "seq_len": seq_len,
        "global_batch": schedule.global_size,
        "steps": steps,
        "warmup_steps": min(warmup_steps, steps),
        "checkpoints": math.ceil(tokens / cfg.phase.checkpoint_every_tokens),
        "tokens_per_gpu_s": rate,
        "gpu_hours": gpu_hours,
        "days": gpu_hours / gpus / 24,
    }


def _reference_flops(cfg) -> float:
    """Training FLOPs per token of the published runs' throughput: this model at seq 1024, with the
    head on pretraining's labelled tokens (CLM all, MLM 30%: ``flops_per_token``'s default)."""
    from ettin.flops import flops_per_token

    return flops_per_token(cfg.model, PUBLISHED_SEQ_LEN)["total"]


def _first_full_step(schedule) -> int:
    """The first step at the full global batch (the ramp's length): sizes never shrink, so bisect."""
    lo, hi = 0, 1
    while schedule.size(hi) < schedule.global_size:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if schedule.size(mid) < schedule.global_size else (lo, mid)
    return lo


def measured_tokens_per_gpu_s(run_dir: str | Path) -> tuple[str, float, int]:
    """(size, tokens/s per GPU scaled to seq 1024, seq_len) from a run's metrics.jsonl and config."""
    from ettin.flops import flops_per_token, label_fraction
    from ettin.launch.runs import newest_checkpoint
    from ettin.train.metrics import read_metrics

    newest = newest_checkpoint(run_dir)
    if newest is None:
        raise ConfigError(f"--from-run {run_dir}: no checkpoint there (its config and world size are read from one)")
    path, state = newest
    cfg = load_config(str(path / CONFIG_FILE))
    rows = read_metrics(run_dir)[1:]  # the first step carries start-up costs
    if not rows:
        raise ConfigError(f"--from-run {run_dir}: metrics.jsonl needs at least two steps")
    per_gpu = statistics.median(r["tokens_per_s"] for r in rows) / state.get("world_size", 1)
    run_flops = flops_per_token(cfg.model, cfg.phase.seq_len, label_fraction=label_fraction(cfg))["total"]
    at_1024 = per_gpu * run_flops / _reference_flops(cfg)
    return cfg.groups.get("model", "?"), at_1024, cfg.phase.seq_len


def parse_throughput(text: str | None, sizes: list[str]) -> dict[str, float]:
    """``--tokens-per-gpu-s``: one number for every size, or ``17m=1e6,150m=3e5`` (others keep the default)."""
    rates = {s: published_tokens_per_gpu_s(s) for s in sizes if s in PUBLISHED_HOURS_2T}
    if not text:
        return rates
    try:
        if "=" not in text:
            return {s: float(text) for s in sizes}
        for item in text.split(","):
            size, value = item.split("=", 1)
            if size.strip() not in sizes:
                raise ConfigError(
                    f"--tokens-per-gpu-s: size '{size.strip()}' is not among --sizes ({', '.join(sizes)})"
                )
            rates[size.strip()] = float(value)
    except ValueError:
        raise ConfigError(
            f"--tokens-per-gpu-s '{text}' must be a number or SIZE=NUMBER,... (tokens/s per GPU at seq 1024)"
        ) from None
    return rates


def plan(
    experiment: str,
    sizes: list[str],
    objectives: list[str],
    phases: list[str],
    gpus: int,
    rates: dict[str, float],
    overrides: list[str],
) -> list[PlanRow]:
    rows = []
    for size in sizes:
        if size not in rates:
            raise ConfigError(f"no throughput known for size '{size}': give --tokens-per-gpu-s {size}=N")
        for objective in objectives:
            for phase in phases:
                cfg = load_config(experiment, [f"model={size}", f"objective={objective}", f"phase={phase}", *overrides])
                rows.append(PlanRow(size, objective, phase, **estimate(cfg, gpus, rates[size])))
    return rows


def _tokens(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:g}"


def format_plan(rows: list[PlanRow], gpus: int) -> str:
    header = (
        "size",
        "objective",
        "phase",
        "tokens",
        "seq",
        "batch",
        "steps",
        "ramp steps",
        "ckpts",
        "tok/s/GPU",
        "GPU-hours",
        f"days on {gpus} GPU{'s' if gpus > 1 else ''}",
    )
    table = [
        (
            r.size,
            r.objective,
            r.phase,
            _tokens(r.tokens),
            str(r.seq_len),
            str(r.global_batch),
            f"{r.steps:,}",
            f"{r.warmup_steps:,}",
            str(r.checkpoints),
            _tokens(r.tokens_per_gpu_s),
            f"{r.gpu_hours:,.0f}",
            f"{r.days:,.1f}",
        )
        for r in rows
    ]
    sizes = list(dict.fromkeys(r.size for r in rows))
    for size in sizes:
        mine = [r for r in rows if r.size == size]
        hours = sum(r.gpu_hours for r in mine)
        table.append(
            (
                size,
                "all",
                "total",
                _tokens(sum(r.tokens for r in mine)),
                "",
                "",
                f"{sum(r.steps for r in mine):,}",
                "",
                str(sum(r.checkpoints for r in mine)),
                "",
                f"{hours:,.0f}",
                f"{hours / gpus / 24:,.1f}",
            )
        )
    return _aligned(header, table, left={0, 1, 2})


def _aligned(header: tuple, table: list[tuple], left: set[int]) -> str:
    """Columns padded to their widest cell; the ``left`` columns left-aligned, numbers right."""
    widths = [max(len(x) for x in col) for col in zip(header, *table)]
    lines = [
        "  ".join(x.ljust(w) if i in left else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths))).rstrip()
        for row in [header, *table]
    ]
    return "\n".join(lines) + "\n"


FOOTNOTE = (
    "Notes: steps assume a sample is about seq_len tokens; samples are document chunks and often shorter, "
    "so real runs take more steps. tok/s/GPU is the throughput at seq 1024 (default: RECIPE.md's published "
    "timings, 4 x H100 for 2T tokens) scaled to each phase's sequence length by training FLOPs per token. "
    "Days assume the runs of a size run one after another on the given GPUs."
)


# ----------------------------------------------------------------------------- the batch ramp (--ramp)


@dataclass
class RampTable:
    size: str
    phase: str
    warmup_tokens: int
    tokens_per_sample: float
    schedule: BatchSchedule  # noqa: F821 - ettin.data.schedule, imported lazily


def ramp_plan(
    experiment: str,
    sizes: list[str],
    phases: list[str],
    overrides: list[str],
    tokens_per_sample: float | None = None,
    objective: str = "mlm",
) -> list[RampTable]:
    """The batch-size ramp of each size and phase that has one. It is counted in real tokens and turned
    into samples at ``tokens_per_sample`` (a run takes its data's mean from stats.json; default here:
    ``phase.seq_len``, the fewest steps). The ramp does not depend on the objective."""
    from ettin.data.schedule import BatchSchedule

    tables = []
    for size in sizes:
        for phase in phases:
            cfg = load_config(experiment, [f"model={size}", f"objective={objective}", f"phase={phase}", *overrides])
            schedule = BatchSchedule.from_config(cfg, tokens_per_sample)
            if schedule.warmup_samples:
                tables.append(RampTable(size, phase, cfg.batch.warmup_tokens, schedule.tokens_per_sample, schedule))
    return tables


def format_ramp(tables: list[RampTable]) -> str:
    if not tables:
        return "no batch-size ramp in these runs\n"
    out = []
    for t in tables:
        s, per = t.schedule, t.tokens_per_sample
        stages = s.ramp()
        out.append(
            f"{t.size} {t.phase}: the global batch ramps from {stages[0][0]:,} to {s.global_size:,} sequences "
            f"in {len(stages)} stages over {_tokens(t.warmup_tokens)} tokens ({per:,.6g} tokens per sample)"
        )
        rows = [
            (str(i), f"{size:,}", f"{first:,}", f"{steps:,}", f"{steps * size:,}", _tokens(steps * size * per))
            for i, (size, first, steps, _) in enumerate(stages, start=1)
        ]
        full_step, full_pos = stages[-1][1] + stages[-1][2], s.bounds(stages[-1][1] + stages[-1][2])[0]
        rows.append(("ramp", "", "", f"{full_step:,}", f"{full_pos:,}", _tokens(full_pos * per)))
        rows.append(("full", f"{s.global_size:,}", f"{full_step:,}", "", "", ""))
        out.append(_aligned(("stage", "batch", "first step", "steps", "samples", "tokens"), rows, left={0}))
    return "\n".join(out)


RAMP_FOOTNOTE = (
    "Notes: the ramp is counted in real tokens and kept in samples: a run converts it at its data's mean "
    "tokens per sample (stats.json; recorded in the ledger's order key), this plan at --tokens-per-sample "
    "(default: seq_len, the fewest steps). Its stages never depend on the number of GPUs."
)


# ----------------------------------------------------------------------------- memory (--memory)


@dataclass
class MemoryRow:
    size: str
    objective: str
    phase: str
    seq_len: int
    micro_per_step: int  # micro-batches per rank in a full step: ceil(rank share / budget), about
    memory: MemoryEstimate  # noqa: F821 - ettin.memory, imported lazily


def memory_plan(
    experiment: str,
    sizes: list[str],
    objectives: list[str],
    phases: list[str],
    gpus: int,
    overrides: list[str],
    micro_tokens: int = 0,
) -> list[MemoryRow]:
    """The memory model (ettin.memory) for each run on ``gpus`` GPUs (DP = gpus / parallel.tensor),
    at ``micro_tokens`` (0: ``batch.micro_tokens``, or the default budget when that is 0 too)."""
    from ettin.memory import estimate, rank_share_tokens

    rows = []
    for size in sizes:
        for objective in objectives:
            for phase in phases:
                cfg = load_config(experiment, [f"model={size}", f"objective={objective}", f"phase={phase}", *overrides])
                tp = cfg.parallel.tensor
                if gpus % tp:
                    raise ConfigError(f"--gpus {gpus} is not divisible by parallel.tensor={tp}")
                dp = gpus // tp
                e = estimate(cfg, dp, tp, micro_tokens or None)
                rows.append(
                    MemoryRow(
                        size,
                        objective,
                        phase,
                        cfg.phase.seq_len,
                        math.ceil(rank_share_tokens(cfg, dp) / max(e.micro_tokens, cfg.phase.seq_len)),
                        e,
                    )
                )
    return rows


def format_memory(rows: list[MemoryRow]) -> str:
    header = (
        "size",
        "objective",
        "phase",
        "seq",
        "TP",
        "ZeRO",
        "DP",
        "micro tok",
        "micro/step",
        "weights",
        "optim",
        "grads",
        "activ",
        "head",
        "overhead",
        "total GB",
        "device GB",
        "fits",
    )
    table = [
        (
            r.size,
            r.objective,
            r.phase,
            str(r.seq_len),
            str(m.tp),
            str(m.zero_stage),
            str(m.dp),
            f"{m.micro_tokens:,}",
            str(r.micro_per_step),
            f"{m.weights:.2f}",
            f"{m.master_and_moments:.2f}",
            f"{m.grads:.2f}",
            f"{m.activations:.1f}",
            f"{m.head:.2f}",
            f"{m.overhead:.1f}",
            f"{m.total:.1f}",
            f"{m.device_memory_gb:g}",
            "yes" if m.fits else "NO",
        )
        for r in rows
        for m in [r.memory]
    ]
    return _aligned(header, table, left={0, 1, 2, 17})


MEMORY_FOOTNOTE = (
    "Notes: predicted peak GB (1e9 bytes) per GPU from ettin.memory: bf16 weights, fp32 master weights and "
    "two moments partitioned by ZeRO over DP (optim), gradients as DeepSpeed holds them (grads), what "
    "autograd keeps for max(micro tok, seq) tokens plus one layer of backward workspace (activ), the fused "
    "vocab head's fp32 buffers (head), CUDA/NCCL allowance and fragmentation (overhead). micro tok: "
    "batch.micro_tokens, or the default (the largest that leaves {:.0%} of the device free); micro/step: "
    "micro-batches per rank in a full step, about. Change the layout with overrides, e.g. "
    "parallel.tensor=2 parallel.zero_stage=2 train.device_memory_gb=141."
)


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """``ettin plan``: wire into ettin.cli's subparsers."""
    p = subparsers.add_parser(
        "plan",
        help="tokens, steps, checkpoints and GPU-hours per size, objective and phase",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--experiment", default="ettin", help="experiment name or YAML (default ettin)")
    p.add_argument("--sizes", default="all", help="comma-separated sizes or all (default all)")
    p.add_argument("--objectives", default="mlm,clm")
    p.add_argument("--phases", default="pretrain,extension,decay,cross")
    p.add_argument("--gpus", type=int, default=4, help="GPUs per run, for days (default 4, as published)")
    p.add_argument(
        "--tokens-per-gpu-s", help="tokens/s per GPU at seq 1024: one number, or SIZE=N,... (default: published)"
    )
    p.add_argument(
        "--from-run",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="measure the throughput of that run's size from its metrics.jsonl (repeatable)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="predicted peak GPU memory per run (ettin.memory) and whether it fits train.device_memory_gb",
    )
    p.add_argument(
        "--micro-tokens",
        type=int,
        default=0,
        help="--memory: tokens per micro-batch per GPU (default: batch.micro_tokens, else the largest that fits)",
    )
    p.add_argument(
        "--ramp",
        action="store_true",
        help="the batch-size warmup per size and phase: each stage's batch size, steps and tokens",
    )
    p.add_argument(
        "--tokens-per-sample",
        type=float,
        default=None,
        help="--ramp: mean tokens per sample of the data (default: seq_len)",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args) -> int:
    from ettin.launch.runs import CHAIN, CROSS, OBJECTIVES, known_sizes, parse_list

    sizes = parse_list(args.sizes, known_sizes(), "size", "--sizes")
    objectives = parse_list(args.objectives, OBJECTIVES, "objective", "--objectives")
    phases = parse_list(args.phases, (*CHAIN, CROSS), "phase", "--phases")
    if args.gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {args.gpus}")
    if args.ramp:
        if args.tokens_per_sample is not None and not args.tokens_per_sample > 0:
            raise ConfigError(f"--tokens-per-sample must be positive, got {args.tokens_per_sample:g}")
        print(
            format_ramp(
                ramp_plan(args.experiment, sizes, phases, args.overrides, args.tokens_per_sample, objectives[0])
            ),
            end="",
        )
        print(RAMP_FOOTNOTE)
        return 0
    if args.memory:
        if args.micro_tokens < 0:
            raise ConfigError(f"--micro-tokens must be >= 0 (0: the default budget), got {args.micro_tokens}")
        from ettin.memory import HEADROOM

        print(
            format_memory(
                memory_plan(args.experiment, sizes, objectives, phases, args.gpus, args.overrides, args.micro_tokens)
            ),
            end="",
        )
        print(MEMORY_FOOTNOTE.format(HEADROOM))
        return 0
    rates = parse_throughput(args.tokens_per_gpu_s, sizes)
    measured = []
    for run_dir in args.from_run:
        size, rate, seq_len = measured_tokens_per_gpu_s(run_dir)
        if size in sizes:
            rates[size] = rate
        measured.append(f"{size}: {_tokens(rate)} tok/s/GPU at seq 1024, measured in {run_dir} (seq {seq_len})")
    rows = plan(args.experiment, sizes, objectives, phases, args.gpus, rates, args.overrides)
    print(format_plan(rows, args.gpus), end="")
    for line in measured:
        print(line)
    print(FOOTNOTE)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ettin.launch.plan``: the same as ``ettin plan`` (tests call it too)."""
    return run_alone(add_plan_parser, "ettin plan", argv)


if __name__ == "__main__":
    sys.exit(main())
