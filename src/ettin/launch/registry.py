"""The run root's record of submitted jobs: ``jobs.json`` (read back by status and cancel) and
``jobs.txt`` (the table a person reads). A later submission into the same run root updates the
records of its runs and keeps the others; a run's earlier job ids stay in its ``history``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

JOBS_JSON = "jobs.json"
JOBS_TXT = "jobs.txt"


def read_jobs(run_root: str | Path) -> dict[str, dict]:
    """Records by run key ({} when nothing was submitted into this run root)."""
    path = Path(run_root) / JOBS_JSON
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["runs"]


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def format_table(records: list[dict]) -> str:
    header = ("run", "job", "depends on", "nodes x tasks", "planned tokens", "run dir")
    rows = [(r["key"], r["job_id"], r.get("dependency") or "-", f"{r['nodes']} x {r['tasks_per_node']}",
             f"{r['planned_tokens']:,}", r["run_dir"]) for r in records]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]) + "\n"


def record_jobs(run_root: str | Path, records: list[dict]) -> None:
    """Merge ``records`` into jobs.json and rewrite jobs.txt (all runs of the run root)."""
    root = Path(run_root)
    runs = read_jobs(root)
    for r in records:
        old = runs.get(r["key"])
        history = (old.get("history", []) + [old["job_id"]]) if old else []
        runs[r["key"]] = {**r, "history": history}
    _write_atomic(root / JOBS_JSON, json.dumps({"runs": runs}, indent=1) + "\n")
    _write_atomic(root / JOBS_TXT, format_table(list(runs.values())))
