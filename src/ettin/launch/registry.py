"""The run root's record of submitted jobs: ``jobs.json`` (read back by status and cancel) and
``jobs.txt`` (the table a person reads). A later submission into the same run root updates the
records of its runs and keeps the others; a run's earlier job ids stay in its ``history``.
"""

from __future__ import annotations

from pathlib import Path

from ettin.fileio import FileError, read_json, write_json_atomic, write_text_atomic

JOBS_JSON = "jobs.json"
JOBS_TXT = "jobs.txt"
# a damaged job record: its runs' folders are intact, only the job ids are lost
JOBS_FIX = (
    "restore it from a backup, or delete it (status then lists the runs from their folders; "
    "cancel their jobs with scancel)"
)
RECORD_KEYS = ("key", "size", "objective", "phase", "run_dir", "job_id")


def read_jobs(run_root: str | Path) -> dict[str, dict]:
    """Records by run key ({} when nothing was submitted into this run root)."""
    path = Path(run_root) / JOBS_JSON
    if not path.is_file():
        return {}
    runs = read_json(path, JOBS_FIX).get("runs")
    if not isinstance(runs, dict) or not all(
        isinstance(r, dict) and all(k in r for k in RECORD_KEYS) for r in runs.values()
    ):
        raise FileError(path, "is not a job record (needs 'runs': run key -> job)", JOBS_FIX)
    return runs


def format_table(records: list[dict]) -> str:
    header = ("run", "job", "depends on", "nodes x tasks", "planned tokens", "run dir")
    rows = [
        (
            r["key"],
            r["job_id"],
            r.get("dependency") or "-",
            f"{r['nodes']} x {r['tasks_per_node']}",
            f"{r['planned_tokens']:,}",
            r["run_dir"],
        )
        for r in records
    ]
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
    write_json_atomic(root / JOBS_JSON, {"runs": runs})
    write_text_atomic(root / JOBS_TXT, format_table(list(runs.values())))
