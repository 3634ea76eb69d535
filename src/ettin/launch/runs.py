"""The runs of a submission: one per (size, objective, phase), their folders and what they start from.

A run's folder is fixed by its key, ``<run_root>/<size>-<objective>-<phase>``, so a requeued or
resubmitted job finds its own checkpoints and resumes. Within one (size, objective) the phases
chain: extension starts from pretrain's final checkpoint, decay from extension's. A
cross-objective run ``<size>-<objective>-cross`` trains ``objective`` starting from the *other*
objective's decay model (``<size>-clm-cross`` is the MLM encoder turned decoder), so it waits for
that run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ettin.config import ConfigError, list_configs
from ettin.fileio import read_json
from ettin.layout import METRICS_FILE, STATE_FILE, list_checkpoints

CHAIN = ("pretrain", "extension", "decay")  # the phases of one objective, in order
CROSS = "cross"
OBJECTIVES = ("mlm", "clm")
DEFAULT_RUN_ROOT = "runs/ettin"  # --run-root of ettin launch submit|status|cancel


def other_objective(objective: str) -> str:
    return "clm" if objective == "mlm" else "mlm"


def size_order(size: str) -> float:
    """17m < 150m < 1b, so that tables read from small to large."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([mb])", size)
    return float(m.group(1)) * (1e6 if m.group(2) == "m" else 1e9) if m else float("inf")


def run_key(size: str, objective: str, phase: str) -> str:
    return f"{size}-{objective}-{phase}"


@dataclass(frozen=True)
class Run:
    """One phase of one model: one Slurm job, one run folder."""

    size: str
    objective: str
    phase: str
    run_dir: Path
    starts_from: str | None = None  # key of the run whose final checkpoint this one starts from

    @property
    def key(self) -> str:
        return run_key(self.size, self.objective, self.phase)

    def overrides(self, run_root: Path) -> list[str]:
        """The `ettin train` overrides that make this run (before the user's own)."""
        out = [f"model={self.size}", f"objective={self.objective}", f"phase={self.phase}", f"run_dir={self.run_dir}"]
        if self.starts_from:
            out.append(f"phase.init_checkpoint={run_root / self.starts_from}")
        return out


def parse_list(text: str, known: list[str] | tuple[str, ...], what: str, flag: str) -> list[str]:
    """``"17m,150m"`` or ``"all"`` -> names, each checked against ``known`` (order kept, duplicates dropped)."""
    if text.strip() == "all":
        return list(known)
    out: list[str] = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        if name not in known:
            raise ConfigError(f"{flag}: unknown {what} '{name}'; known: {', '.join(known)} (or all)")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError(f"{flag}: name at least one {what} (known: {', '.join(known)}, or all)")
    return out


def known_sizes() -> list[str]:
    return sorted(list_configs()["model"], key=size_order)


def parse_phases(text: str) -> list[str]:
    if CROSS in [p.strip() for p in text.split(",")]:
        raise ConfigError("--phases: the cross-objective runs are added with --cross, not named in --phases")
    return parse_list(text, CHAIN, "phase", "--phases")


def plan_runs(sizes: list[str], objectives: list[str], phases: list[str], cross: bool, run_root: Path) -> list[Run]:
    """Every run of the submission, each listed after the run it starts from (when that is in it too)."""
    run_root = Path(run_root)
    runs = []
    for size in sorted(sizes, key=size_order):
        for objective in objectives:
            for i, phase in enumerate(CHAIN):
                if phase in phases:
                    previous = run_key(size, objective, CHAIN[i - 1]) if i else None
                    runs.append(Run(size, objective, phase, run_root / run_key(size, objective, phase), previous))
        if cross:
            for objective in objectives:
                source = run_key(size, other_objective(objective), CHAIN[-1])
                runs.append(Run(size, objective, CROSS, run_root / run_key(size, objective, CROSS), source))
    return runs


# ----------------------------------------------------------------------------- reading a run folder
# (ettin.layout: the checkpoint layout, read without importing torch)


def newest_checkpoint(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint of a run (folders being written start with a dot) and its state.json."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    path = found[-1]
    return path, read_json(
        path / STATE_FILE,
        "restore it, or move the damaged checkpoint folder aside "
        "(`ettin checkpoint verify` checks a run's checkpoints)",
    )


def is_complete(run_dir: str | Path) -> bool:
    """The run's phase is done: its newest checkpoint is marked final."""
    newest = newest_checkpoint(run_dir)
    return bool(newest and newest[1].get("final"))


def last_metrics(run_dir: str | Path) -> dict | None:
    """The last training row of ``metrics.jsonl`` (read from the end: the file grows for weeks),
    with the newest validation loss before it, when there is one (``eval_loss``)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 65536))
        lines = [line for line in f.read().splitlines() if line.strip()]
    row, eval_loss = None, None
    for line in reversed(lines):
        try:
            body = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill, or the cut start of the window
            continue
        if "loss" in body:  # evaluation rows carry eval/<set>/... instead
            row = row or body
        elif eval_loss is None:
            eval_loss = body.get("eval/total/loss", next((v for k, v in body.items() if k.endswith("/loss")), None))
        if row is not None and eval_loss is not None:
            break
    return None if row is None else {**row, **({"eval_loss": eval_loss} if eval_loss is not None else {})}
