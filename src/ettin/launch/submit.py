"""``ettin launch submit``: one Slurm job per (size, objective, phase), chained, through submitit.

Every input is checked before anything is submitted: sizes, objectives and phases exist, the
rank count divides by the TP size, every run's config composes (so a typo fails here, not
after a week in the queue), the run root is writable, Slurm answers, and no run already has a
live job. Later phases wait for earlier ones (``afterok``), cross-objective runs for the other
objective's decay run; all jobs also carry ``singleton`` (one job per run at a time). If a
submission fails half way, the jobs it already submitted are cancelled. ``python -m launch.submit``
is the same command under its old name.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ettin.config import ConfigError, config_dir, load_config, validate
from ettin.errors import EXIT_REQUEUE, run_alone
from ettin.launch.cluster import SlurmError, cancel, job_info, require_slurm, vet_submission
from ettin.launch.registry import JOBS_JSON, JOBS_TXT, format_table, read_jobs, record_jobs
from ettin.launch.runs import (
    DEFAULT_RUN_ROOT,
    OBJECTIVES,
    Run,
    is_complete,
    known_sizes,
    parse_list,
    parse_phases,
    plan_runs,
)
from ettin.launch.slurm_job import JobSpec, TrainTask, job_name, sbatch_text, submitit_parameters

# set per run by the launcher; a user override of them would give every run the same value
RESERVED = {
    "model": "--sizes",
    "objective": "--objectives",
    "phase": "--phases / --cross",
    "run_dir": "--run-root",
    "phase.init_checkpoint": "the phase chain",
    "parallel.tensor": "--tp",
}
DRY_RUN_MARK = "#### ettin dry-run:"


def add_submit_parser(subparsers) -> argparse.ArgumentParser:
    """``submit``: one parser for ``ettin launch submit`` and ``python -m launch.submit`` (the same flags)."""
    p = subparsers.add_parser(
        "submit",
        help="submit one Slurm job per (size, objective, phase), chained",
        description="Submit one Slurm job per (size, objective, phase) through submitit, each later phase "
        f"waiting for the earlier one. Jobs requeue themselves when ettin train stops early (exit {EXIT_REQUEUE}).",
        epilog="Example: ettin launch submit --sizes 17m,150m --objectives mlm,clm --cross --nodes 1 "
        f"--gpus-per-node 4 --partition gpu --time 24:00:00 --run-root {DEFAULT_RUN_ROOT}",
    )
    p.add_argument("--sizes", required=True, help="comma-separated model sizes (17m,32m,68m,150m,400m,1b) or all")
    p.add_argument("--objectives", default="mlm,clm", help="mlm, clm or both (default mlm,clm)")
    p.add_argument("--phases", default="pretrain,extension,decay", help="default pretrain,extension,decay")
    p.add_argument(
        "--cross", action="store_true", help="add the cross-objective runs (each from the other objective's decay)"
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=4, help="GPUs per node = tasks per node (default 4)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument(
        "--cpu", action="store_true", help="CPU ranks instead of GPUs (--gpus-per-node ranks per node; tests)"
    )
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", default="24:00:00", help="time limit per attempt, HH:MM:SS (default 24:00:00)")
    p.add_argument(
        "--signal-seconds", type=int, default=120, help="USR2 this long before the limit (>= 90, default 120)"
    )
    p.add_argument("--max-requeues", type=int, default=200, help="requeues per job before it fails (default 200)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--setup", action="append", default=[], help="a shell line to run before srun (repeatable)")
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. constraint=h100 or gres=gpu:4 (repeatable)",
    )
    p.add_argument("--python", default=sys.executable, help="the Python of the nodes (default: this one)")
    p.add_argument(
        "--run-root", default=DEFAULT_RUN_ROOT, help=f"one folder per run under it (default {DEFAULT_RUN_ROOT})"
    )
    p.add_argument("--experiment", default="ettin", help="experiment name or YAML (default ettin)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch scripts, submit nothing")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    p.set_defaults(func=submit)
    return p


def _spec(args) -> JobSpec:
    sbatch = {}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--sbatch '{item}' must look like KEY=VALUE (e.g. constraint=h100)")
        sbatch[key.strip().lstrip("-")] = value
    spec = JobSpec(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpu=args.cpu,
        tp=args.tp,
        time=args.time,
        signal_s=args.signal_seconds,
        max_requeues=args.max_requeues,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        cpus_per_task=args.cpus_per_task,
        python=args.python,
        setup=args.setup,
        sbatch_args=sbatch,
    )
    spec.check()
    return spec


def _check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in RESERVED:
            raise ConfigError(f"override '{item}': {key} is set per run by {RESERVED[key]}; drop it")


def check_writable(run_root: Path, create: bool) -> None:
    """The run root can hold run folders (created when ``create``; else the nearest existing folder is checked)."""
    try:
        if create:
            run_root.mkdir(parents=True, exist_ok=True)
            probe = run_root / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
            return
        existing = run_root
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        if not os.access(existing, os.W_OK):
            raise PermissionError(f"{existing} is not writable")
    except OSError as e:
        raise ConfigError(f"run root {run_root} is not writable ({e.strerror or e}): pick another --run-root") from None


def _experiment(name: str) -> str:
    path = Path(name)
    return str(path.resolve()) if path.suffix in (".yaml", ".yml") and path.is_file() else name


def run_argv(run: Run, run_root: Path, experiment: str, spec: JobSpec, overrides: list[str]) -> list[str]:
    extra = (["train.device=cpu"] if spec.cpu else []) + ([f"parallel.tensor={spec.tp}"] if spec.tp != 1 else [])
    return ["train", experiment, *run.overrides(run_root), *extra, *overrides]


def _dependency(run: Run, run_root: Path, submitted: dict[str, str], recorded: dict, live: set[str]) -> str | None:
    """afterok on the job of the run this one starts from, when that run is not finished yet."""
    src = run.starts_from
    if src is None:
        return None
    if src in submitted:
        return f"afterok:{submitted[src]}"
    if is_complete(run_root / src):
        return None
    if src in recorded and recorded[src]["job_id"] in live:
        return f"afterok:{recorded[src]['job_id']}"
    raise ConfigError(
        f"{run.key} starts from {src}, which is not in this submission, has no live job and no final "
        f"checkpoint in {run_root / src}: submit its phase too (--phases / --objectives) or train it first"
    )


@dataclass
class Submission:
    """A checked submission: its runs, each run's `ettin train` argv and plan, and what already runs."""

    spec: JobSpec
    run_root: Path
    runs: list[Run]
    argvs: dict[str, list[str]]
    planned: dict[str, tuple[int, int]]  # key -> (phase tokens, seq_len)
    recorded: dict[str, dict]  # jobs.json of the run root
    live: set[str]  # recorded job ids that are pending or running
    env: dict[str, str]  # for every task: the config folder of this checkout

    def task(self, run: Run) -> TrainTask:
        return TrainTask(self.argvs[run.key], {**self.env, "ETTIN_RUN": run.key})


def prepare(args) -> Submission:
    """Check everything before anything is submitted; raise ConfigError / SlurmError (one line) if not fine."""
    sizes = parse_list(args.sizes, known_sizes(), "size", "--sizes")
    objectives = parse_list(args.objectives, OBJECTIVES, "objective", "--objectives")
    phases = parse_phases(args.phases)
    _check_overrides(args.overrides)
    spec = _spec(args)
    run_root = Path(args.run_root).resolve()
    experiment = _experiment(args.experiment)
    runs = plan_runs(sizes, objectives, phases, args.cross, run_root)

    argvs, planned = {}, {}
    for run in runs:  # every config composes and fits the ranks
        argv = run_argv(run, run_root, experiment, spec, args.overrides)
        try:
            cfg = load_config(experiment, argv[2:])
            validate(cfg, spec.world_size)
        except ConfigError as e:
            raise ConfigError(f"{run.key}: {e}") from None
        argvs[run.key], planned[run.key] = argv, (cfg.phase.tokens, cfg.phase.seq_len)

    check_writable(run_root, create=not args.dry_run)
    recorded = read_jobs(run_root)
    if args.dry_run:  # no Slurm needed: a recorded job is taken as live
        live = {r["job_id"] for r in recorded.values()}
    else:
        require_slurm()
        infos = job_info([r["job_id"] for r in recorded.values()])
        live = {j for j, info in infos.items() if info.active}
        for run in runs:  # one job per run folder at a time
            old = recorded.get(run.key)
            if old and old["job_id"] in live:
                raise ConfigError(
                    f"{run.key} already has job {old['job_id']} ({infos[old['job_id']].state}); cancel it "
                    f"(ettin launch cancel --run-root {run_root} --runs {run.key}) or leave it out"
                )
    sub = Submission(spec, run_root, runs, argvs, planned, recorded, live, {"ETTIN_CONFIG_DIR": str(config_dir())})
    placeholders = {run.key: f"<{run.key}>" for run in runs}
    for run in runs:  # every run's starting point exists, or will
        _dependency(run, run_root, placeholders, recorded, live)
    return sub


def _job_parameters(sub: Submission, run: Run, ids: dict[str, str]) -> tuple[str | None, dict]:
    after = _dependency(run, sub.run_root, ids, sub.recorded, sub.live)
    return after, submitit_parameters(sub.spec, run.key, sub.task(run), ",".join(d for d in (after, "singleton") if d))


def print_dry_run(sub: Submission) -> None:
    placeholders = {run.key: f"<{run.key}>" for run in sub.runs}
    for run in sub.runs:
        _, params = _job_parameters(sub, run, placeholders)
        print(f"{DRY_RUN_MARK} {run.key} -> {run.run_dir} ####")
        print(sbatch_text(params, run.run_dir / "slurm", sub.spec.python))
    print(f"dry run: {len(sub.runs)} sbatch scripts, nothing submitted", file=sys.stderr)


def submit_jobs(sub: Submission) -> list[dict]:
    """Submit every run in order (dependencies first); on a failure cancel what this call submitted."""
    import submitit

    first = sub.runs[0]  # all runs ask for the same resources: Slurm vets them once, before anything is queued
    params = submitit_parameters(sub.spec, first.key, sub.task(first), None)
    vet_submission(sbatch_text(params, first.run_dir / "slurm", sub.spec.python))

    spec, submitted, records = sub.spec, {}, []
    sbatch_stderr = tempfile.TemporaryFile(mode="w+")
    try:
        for run in sub.runs:
            after, params = _job_parameters(sub, run, submitted)
            folder = run.run_dir / "slurm"
            folder.mkdir(parents=True, exist_ok=True)
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0, python=shlex.quote(spec.python))
            executor.update_parameters(**params)
            with _stderr_into(sbatch_stderr):  # sbatch's own messages: kept for the one error line
                job = executor.submit(sub.task(run))
            submitted[run.key] = job.job_id
            tokens, seq_len = sub.planned[run.key]
            records.append(
                {
                    "key": run.key,
                    "size": run.size,
                    "objective": run.objective,
                    "phase": run.phase,
                    "run_dir": str(run.run_dir),
                    "job_id": job.job_id,
                    "job_name": job_name(run.key),
                    "dependency": after,
                    "starts_from": run.starts_from,
                    "nodes": spec.nodes,
                    "tasks_per_node": spec.gpus_per_node,
                    "tp": spec.tp,
                    "cpu": spec.cpu,
                    "time": spec.time,
                    "max_requeues": spec.max_requeues,
                    "planned_tokens": tokens,
                    "seq_len": seq_len,
                    "argv": sub.argvs[run.key],
                    "log": str(folder / f"{job.job_id}_0_log.out"),
                    "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
    except Exception as e:
        cancel(list(submitted.values()))
        sbatch_stderr.seek(0)
        said = [line.strip() for line in sbatch_stderr.read().splitlines() if "error" in line.lower()]
        why = said[-1] if said else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SlurmError(
            f"submitting {run.key} failed ({why}); cancelled the {len(submitted)} job(s) submitted before it"
        ) from None
    return records


def submit(args) -> int:
    sub = prepare(args)
    if args.dry_run:
        print_dry_run(sub)
        return 0
    records = submit_jobs(sub)
    record_jobs(sub.run_root, records)
    print(format_table(records), end="")
    print(f"{len(records)} jobs submitted; table in {sub.run_root / JOBS_TXT} and {sub.run_root / JOBS_JSON}")
    return 0


@contextlib.contextmanager
def _stderr_into(file):
    """Point file descriptor 2 (what child processes such as sbatch write to) at ``file`` for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    """``python -m launch.submit``: ``ettin launch submit`` under its old name (tests call it too)."""
    return run_alone(add_submit_parser, "python -m launch.submit", argv)
