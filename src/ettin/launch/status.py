"""``ettin launch status`` and ``ettin launch cancel``: the runs of a run root, and stopping them.

Status joins three sources per run: the job (``jobs.json`` -> Slurm's state and requeue count),
the newest complete checkpoint (``state.json``: tokens, final), and the last line of
``metrics.jsonl`` (tokens and loss of the latest step, which may be past the checkpoint). Run
folders without a recorded job (submitted with the sbatch templates, say) are listed too.
``python -m launch.status`` and ``python -m launch.cancel`` are the same commands under their old names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ettin.config import ConfigError
from ettin.errors import run_alone
from ettin.fileio import FileError, read_yaml
from ettin.launch.cluster import cancel, job_info
from ettin.launch.registry import read_jobs
from ettin.launch.runs import (
    CHAIN,
    CROSS,
    DEFAULT_RUN_ROOT,
    OBJECTIVES,
    known_sizes,
    last_metrics,
    newest_checkpoint,
    parse_list,
    size_order,
)
from ettin.layout import CONFIG_FILE

PHASE_ORDER = {p: i for i, p in enumerate((*CHAIN, CROSS))}


def _planned_from_checkpoint(path: Path) -> int | None:
    try:
        tokens = (read_yaml(path / CONFIG_FILE).get("phase") or {}).get("tokens")
    except FileError:  # an old, foreign or damaged checkpoint: planned tokens unknown
        return None
    return int(tokens) if isinstance(tokens, (int, float)) else None


def _split_key(key: str) -> tuple[str, str, str]:
    size, objective, phase = (key.split("-", 2) + ["?", "?"])[:3]
    return size, objective, phase


def collect(run_root: str | Path, query_slurm: bool = True) -> list[dict]:
    """One row per run of the run root: job state, progress, last checkpoint, last loss."""
    root = Path(run_root)
    records = read_jobs(root)
    keys = (
        set(records)
        | {p.parent.name for p in root.glob("*/checkpoints")}
        | {p.parent.name for p in root.glob("*/metrics.jsonl")}
    )
    infos = job_info([r["job_id"] for r in records.values()]) if (query_slurm and records) else {}
    rows = []
    for key in keys:
        rec = records.get(key, {})
        size, objective, phase = (rec["size"], rec["objective"], rec["phase"]) if rec else _split_key(key)
        run_dir = Path(rec.get("run_dir", root / key))
        newest = newest_checkpoint(run_dir)
        metrics = last_metrics(run_dir) or {}
        info = infos.get(rec.get("job_id", ""))
        planned = rec.get("planned_tokens") or (newest and _planned_from_checkpoint(newest[0]))
        done = metrics.get("tokens", newest[1]["tokens"] if newest else 0)
        rows.append(
            {
                "run": key,
                "size": size,
                "objective": objective,
                "phase": phase,
                "run_dir": str(run_dir),
                "job_id": rec.get("job_id"),
                "state": info.state if info else ("UNKNOWN" if rec and query_slurm else "-"),
                "reason": info.reason if info else "",
                "restarts": info.restarts if info else 0,
                "exit_code": info.exit_code if info else "",
                "tokens": done,
                "planned_tokens": planned,
                "checkpoint": newest[0].name if newest else None,
                "checkpoint_tokens": newest[1]["tokens"] if newest else 0,
                "final": bool(newest and newest[1].get("final")),
                "step": metrics.get("step", 0),
                "loss": metrics.get("loss"),
                "eval_loss": metrics.get("eval_loss"),
            }
        )
    rows.sort(key=lambda r: (size_order(r["size"]), r["objective"], PHASE_ORDER.get(r["phase"], 9)))
    return rows


def _tokens(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def format_status(rows: list[dict]) -> str:
    header = (
        "run",
        "phase",
        "job",
        "state",
        "requeues",
        "tokens done / planned",
        "last checkpoint",
        "loss",
        "val loss",
    )
    table = []
    for r in rows:
        pct = f" ({100 * r['tokens'] / r['planned_tokens']:.0f}%)" if r["planned_tokens"] else ""
        ckpt = (
            f"{r['checkpoint']} ({_tokens(r['checkpoint_tokens'])}{', final' if r['final'] else ''})"
            if r["checkpoint"]
            else "-"
        )
        state = r["state"] + (
            f" ({r['reason']})" if r["reason"] not in ("", "None") and r["state"] == "PENDING" else ""
        )
        table.append(
            (
                r["run"],
                r["phase"],
                r["job_id"] or "-",
                state,
                str(r["restarts"]),
                f"{_tokens(r['tokens'])} / {_tokens(r['planned_tokens'])}{pct}",
                ckpt,
                f"{r['loss']:.4f}" if r["loss"] is not None else "-",
                f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "-",
            )
        )
    widths = [max(len(x) for x in col) for col in zip(header, *table)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *table]) + "\n"


def _check_root(run_root: Path) -> None:
    if not run_root.is_dir():
        raise ConfigError(f"run root {run_root} does not exist: pass the --run-root you submitted with")


def add_status_parser(subparsers) -> argparse.ArgumentParser:
    """``status``: one parser for ``ettin launch status`` and ``python -m launch.status``."""
    p = subparsers.add_parser(
        "status",
        help="job state and progress of every run of a run root",
        description="Job state and progress of every run of a run root.",
    )
    p.add_argument("--run-root", default=DEFAULT_RUN_ROOT)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--no-slurm", action="store_true", help="do not ask Slurm for job states (progress only)")
    p.set_defaults(func=cmd_status)
    return p


def cmd_status(args) -> int:
    root = Path(args.run_root).resolve()
    _check_root(root)
    rows = collect(root, query_slurm=not args.no_slurm)
    print(json.dumps(rows, indent=1) if args.json else format_status(rows), end="\n" if args.json else "")
    return 0


def add_cancel_parser(subparsers) -> argparse.ArgumentParser:
    """``cancel``: one parser for ``ettin launch cancel`` and ``python -m launch.cancel``."""
    p = subparsers.add_parser(
        "cancel",
        help="cancel the live jobs of a run root",
        description="Cancel the live jobs of a run root (all of them, or those selected).",
    )
    p.add_argument("--run-root", default=DEFAULT_RUN_ROOT)
    p.add_argument("--sizes", default="all")
    p.add_argument("--objectives", default="all")
    p.add_argument("--phases", default="all", help="pretrain, extension, decay, cross (default all)")
    p.add_argument("--runs", help="run keys such as 17m-mlm-pretrain (instead of the filters)")
    p.set_defaults(func=cmd_cancel)
    return p


def cmd_cancel(args) -> int:
    root = Path(args.run_root).resolve()
    _check_root(root)
    records = read_jobs(root)
    if args.runs:
        chosen = parse_list(args.runs, sorted(records), "run", "--runs")
    else:
        sizes = parse_list(args.sizes, known_sizes(), "size", "--sizes")
        objectives = parse_list(args.objectives, OBJECTIVES, "objective", "--objectives")
        phases = parse_list(args.phases, (*CHAIN, CROSS), "phase", "--phases")
        chosen = [
            k
            for k, r in records.items()
            if r["size"] in sizes and r["objective"] in objectives and r["phase"] in phases
        ]
    infos = job_info([records[k]["job_id"] for k in chosen])
    live = [k for k in chosen if infos[records[k]["job_id"]].active]
    cancel([records[k]["job_id"] for k in live])
    for k in live:
        print(f"cancelled {k} (job {records[k]['job_id']}, was {infos[records[k]['job_id']].state})")
    print(f"{len(live)} job(s) cancelled; {len(chosen) - len(live)} selected run(s) had no live job")
    return 0


def status_main(argv: list[str] | None = None) -> int:
    """``python -m launch.status``: ``ettin launch status`` under its old name (tests call it too)."""
    return run_alone(add_status_parser, "python -m launch.status", argv)


def cancel_main(argv: list[str] | None = None) -> int:
    """``python -m launch.cancel``: ``ettin launch cancel`` under its old name (tests call it too)."""
    return run_alone(add_cancel_parser, "python -m launch.cancel", argv)
