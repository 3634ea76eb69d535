"""The few Slurm client calls the launcher needs: is Slurm there, what state is a job in, cancel.

Job states come from ``scontrol show job`` (slurmctld keeps finished jobs for MinJobAge), then
from ``sacct`` (real accounting), then from ``sacct -c`` (the jobcomp/filetxt log of clusters
without slurmdbd, such as slurm/local). Every client needs ``SLURM_CONF`` when the cluster's
configuration is not in the default place.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from ettin.errors import EttinError

# States in which a job will still run (or is running): a run with such a job must not get a second one.
ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "RESV_DEL_HOLD",
    "SPECIAL_EXIT",
}


class SlurmError(EttinError):
    """Slurm cannot be used; str() is one line naming the cause and the fix."""


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{cmd[0]} did not answer within {timeout:g} s")
    except OSError as e:
        return subprocess.CompletedProcess(cmd, 127, "", str(e))


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no output"


def require_slurm() -> None:
    """Raise SlurmError unless sbatch is installed and slurmctld answers."""
    hint = "start the local cluster (make slurm-up, then export the SLURM_CONF it prints) or run on a Slurm login node"
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        raise SlurmError(f"Slurm is not reachable: sbatch/scontrol not found on PATH; {hint}")
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):  # the clients would retry reading it for a minute
        raise SlurmError(f"Slurm is not reachable: SLURM_CONF={conf} does not exist; {hint}")
    out = _run(["scontrol", "ping"], timeout=30)
    if out.returncode != 0 or " is UP" not in out.stdout:
        why = _first_line(out.stdout if " is DOWN" in out.stdout else out.stderr or out.stdout)
        raise SlurmError(
            f"Slurm is not reachable (scontrol ping via {conf or 'the default slurm.conf'}: {why}); {hint}"
        )


@dataclass
class JobInfo:
    job_id: str
    state: str  # COMPLETED, RUNNING, PENDING, FAILED, ... or UNKNOWN
    reason: str = ""
    restarts: int = 0
    exit_code: str = ""
    start_time: str = ""
    end_time: str = ""
    dependency: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def _scontrol_job(job_id: str) -> JobInfo | None:
    out = _run(["scontrol", "-o", "show", "job", job_id])
    if out.returncode != 0 or "JobId=" not in out.stdout:
        return None
    fields = dict(re.findall(r"(\w[\w/:]*)=(\S*)", out.stdout.splitlines()[0]))
    return JobInfo(
        job_id,
        fields.get("JobState", "UNKNOWN"),
        fields.get("Reason", ""),
        int(fields.get("Restarts", 0) or 0),
        fields.get("ExitCode", ""),
        fields.get("StartTime", ""),
        fields.get("EndTime", ""),
        "" if fields.get("Dependency") == "(null)" else fields.get("Dependency", ""),
    )


def _sacct_jobs(job_ids: list[str], completion_log: bool) -> dict[str, JobInfo]:
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode,Start,End", "-j", ",".join(job_ids)]
    if completion_log:
        cmd.insert(1, "-c")
    out = _run(cmd)
    found = {}
    if out.returncode == 0:
        for line in out.stdout.splitlines():
            parts = line.split("|")
            if len(parts) >= 5 and parts[0] in job_ids:
                found[parts[0]] = JobInfo(
                    parts[0],
                    parts[1].split()[0] if parts[1] else "UNKNOWN",
                    exit_code=parts[2],
                    start_time=parts[3],
                    end_time=parts[4],
                )
    return found


def job_info(job_ids: list[str]) -> dict[str, JobInfo]:
    """The state of each job id (UNKNOWN when no source knows it any more)."""
    ids = [str(j) for j in job_ids if j]
    out: dict[str, JobInfo] = {}
    for job_id in ids:
        info = _scontrol_job(job_id)
        if info:
            out[job_id] = info
    for completion_log in (False, True):
        missing = [j for j in ids if j not in out]
        if missing and shutil.which("sacct"):
            out.update(_sacct_jobs(missing, completion_log))
    for job_id in ids:
        out.setdefault(job_id, JobInfo(job_id, "UNKNOWN"))
    return out


def vet_submission(script: str) -> None:
    """``sbatch --test-only``: Slurm checks partition, account, QOS, resources and options; nothing is queued."""
    out = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        errors = [line for line in out.stderr.splitlines() if "error" in line.lower()] or [_first_line(out.stderr)]
        raise SlurmError(
            f"Slurm rejects the job ({errors[-1].strip()}): fix --partition/--account/--qos/--time/--sbatch "
            "or ask for resources the cluster has"
        )


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        out = _run(["scancel", *job_ids])
        if out.returncode != 0:
            raise SlurmError(f"scancel {' '.join(job_ids)} failed: {_first_line(out.stderr)}")
