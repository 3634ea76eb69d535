"""What one run's Slurm job is: its sbatch script (written by submitit) and its requeue rule.

The job starts one task per GPU (``--ntasks-per-node = --gpus-per-node``; CPU ranks with
``--cpu``). Each task is submitit's bootstrap, which unpickles :class:`TrainTask`; the task then
*becomes* ``python -m ettin.cli train ...`` (``os.execv``), so Slurm's signals reach the trainer
directly and the task's exit code is the trainer's. The trainer reads its rank and rendezvous
from the Slurm environment (first node of the allocation, a port derived from the job id).

Why not submitit's own requeue: submitit catches USR2 in rank 0 only and calls ``checkpoint()``
inside the signal handler, mid-step, then requeues. Contract 7 (docs/DESIGN.md) wants every rank to stop at the
same step boundary and save collectively. So the trainer handles USR2 itself, saves, and exits
75 ("requeue me"); the batch script (:func:`requeue_lines`, the same text as in
``slurm/ettin-train.sbatch``) then runs ``scontrol requeue`` while ``SLURM_RESTART_COUNT`` is
below the cap. Any other non-zero exit fails the job, and its dependents are cancelled
(``--kill-on-invalid-dep=yes``).

Failure detection: ``srun --kill-on-bad-exit=1``. When one rank dies (kill -9, OOM killer, a
crash) or exits non-zero, slurmstepd sends TERM to the step's other tasks at once and KILL after
the cluster's ``KillWait``, so the job ends within seconds, whatever the transport: NCCL does not
notice a dead peer and would otherwise wait for ``train.collective_timeout_s`` (600 s). That
timeout stays the backstop for a rank that hangs without exiting. It does not break the requeue:
a rank leaves with 75 only after the collective save has committed the checkpoint (rank 0 renames
it into place before it sends the checkpoint's name to the others), and from then on the trainer
ignores TERM, so the peers that Slurm signals finish their own exit 75 and srun reports 75.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ettin.config import ConfigError
from ettin.errors import EXIT_REQUEUE

SIGNAL_EXIT = 128 + 12  # srun's code for a task killed by USR2: warned before the trainer listened
MIN_SIGNAL_S = 90  # the warning must leave the save this long
SLURM_CHECK_S = 30  # slurmctld checks time limits this often: a warning may come this much early
MIN_TRAIN_S = 60  # a job must be able to train this long before its warning
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def parse_time(text: str) -> int:
    """Slurm's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ConfigError(f"--time '{text}' is not a Slurm time: use HH:MM:SS (or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    a, b, c = int(a), int(b or 0), int(c or 0)
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + a * 3600 + b * 60 + c
    if m.group(4) is not None:  # HH:MM:SS
        return a * 3600 + b * 60 + c
    return a * 60 + b  # MM or MM:SS


@dataclass
class JobSpec:
    """The resources and Slurm options shared by every run of a submission."""

    nodes: int = 1
    gpus_per_node: int = 4  # = tasks per node: one rank per GPU (or per CPU rank with cpu=True)
    cpu: bool = False  # CPU ranks (tests, the local cluster): no GPUs requested, train.device=cpu
    tp: int = 1
    time: str = "24:00:00"
    signal_s: int = 120
    max_requeues: int = 200
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None
    python: str = field(default_factory=lambda: sys.executable)
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load, ...)
    sbatch_args: dict[str, str] = field(default_factory=dict)  # any other sbatch option, e.g. constraint=h100

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"--nodes ({self.nodes}) and --gpus-per-node ({self.gpus_per_node}) must be >= 1")
        if self.tp < 1 or self.world_size % self.tp:
            raise ConfigError(
                f"--nodes {self.nodes} x --gpus-per-node {self.gpus_per_node} = {self.world_size} ranks "
                f"is not divisible by --tp {self.tp}: pick a TP size that divides the rank count"
            )
        if self.signal_s < MIN_SIGNAL_S:
            raise ConfigError(
                f"--signal-seconds {self.signal_s} is too short: the save needs >= {MIN_SIGNAL_S} s of warning"
            )
        limit = parse_time(self.time)
        if limit - self.signal_s - SLURM_CHECK_S < MIN_TRAIN_S:
            raise ConfigError(
                f"--time {self.time} leaves under {MIN_TRAIN_S} s to train before the USR2 warning "
                f"({self.signal_s} s before the limit, up to {SLURM_CHECK_S} s early): give a --time of at least "
                f"{_hms(self.signal_s + SLURM_CHECK_S + MIN_TRAIN_S)}"
            )
        if self.max_requeues < 0:
            raise ConfigError(f"--max-requeues must be >= 0, got {self.max_requeues}")


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def requeue_lines(max_requeues: int | str) -> list[str]:
    """The end of every job script: requeue on exit 75 below the cap, else exit with srun's code.

    ``srun`` returns the highest exit code of its tasks; all ranks of ``ettin train`` leave together,
    so 75 means every rank saved. ``SLURM_RESTART_COUNT`` counts earlier requeues (preemptions too).
    """
    cap = str(max_requeues)
    return [
        "code=$?  # srun's status: the highest exit code of the ranks of ettin train",
        "attempt=${SLURM_RESTART_COUNT:-0}",
        f'if [ "$code" -eq {EXIT_REQUEUE} ] || [ "$code" -eq {SIGNAL_EXIT} ]; then  # saved and stopped early / warned before it listened',
        f'    if [ "$attempt" -lt {cap} ]; then',
        f'        echo "ettin: job $SLURM_JOB_ID stopped early (exit $code): requeue $((attempt + 1)) of {cap}; the next attempt resumes from the newest checkpoint"',
        '        scontrol requeue "$SLURM_JOB_ID" && sleep 600  # Slurm ends this attempt here',
        '        echo "ettin: scontrol requeue $SLURM_JOB_ID failed: resubmit the run to continue it"',
        "    else",
        f'        echo "ettin: job $SLURM_JOB_ID stopped early but has been requeued {cap} times already (the cap): resubmit the run to continue it"',
        "    fi",
        "fi",
        'exit "$code"',
    ]


@dataclass
class TrainTask:
    """The function submitit runs in every task: replace this process with ``ettin train``.

    ``os.execv`` keeps the pid Slurm started (signals reach the trainer, its exit code is the
    task's) and drops submitit's USR2 handler (handlers do not survive exec).
    """

    argv: list[str]  # ["train", experiment, *overrides]
    env: dict[str, str] = field(default_factory=dict)

    def __call__(self) -> None:
        for name in TORCHRUN_VARS:  # inherited from the submitting shell; Slurm's own variables decide here
            os.environ.pop(name, None)
        os.environ.update(self.env)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-u", "-m", "ettin.cli", *self.argv])


def train_command(task: TrainTask, python: str = "python") -> str:
    return shlex.join([python, "-m", "ettin.cli", *task.argv])


def job_name(key: str) -> str:
    return f"ettin-{key}"


def submitit_parameters(spec: JobSpec, key: str, task: TrainTask, dependency: str | None) -> dict:
    """``SlurmExecutor.update_parameters`` arguments for one run (submitit writes the script from them)."""
    additional = {"requeue": True, "time": spec.time, "kill-on-invalid-dep": "yes", **spec.sbatch_args}
    params = {
        "job_name": job_name(key),
        "nodes": spec.nodes,
        "ntasks_per_node": spec.gpus_per_node,
        "time": math.ceil(parse_time(spec.time) / 60),  # submitit's own bookkeeping; --time comes from `additional`
        "signal_delay_s": spec.signal_s,
        "stderr_to_stdout": True,
        "wckey": None,  # submitit's default "submitit" is rejected where wckeys are tracked
        "srun_args": ["--open-mode=append", "--kill-on-bad-exit=1"],  # a dead rank ends the step (module docstring)
        "setup": [
            f"# ettin run {key}: every task runs  {train_command(task, spec.python)}",
            *(f"export {k}={shlex.quote(v)}" for k, v in task.env.items()),
            'echo "ettin: $ETTIN_RUN job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST at $(date -Is)"',
            *spec.setup,
        ],
        "teardown": requeue_lines(spec.max_requeues),
        "additional_parameters": additional,
    }
    if not spec.cpu:
        params["gpus_per_node"] = spec.gpus_per_node
    for key_, value in (
        ("partition", spec.partition),
        ("account", spec.account),
        ("qos", spec.qos),
        ("cpus_per_task", spec.cpus_per_task),
        ("dependency", dependency),
    ):
        if value:
            params[key_] = value
    return params


def sbatch_text(params: dict, folder: Path, python: str) -> str:
    """The script submitit would submit with ``params`` (for --dry-run; submitit writes the same)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **params)
