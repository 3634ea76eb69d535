"""Where this process sits in the job: torchrun's variables, or Slurm's when those are absent."""

from __future__ import annotations

import os
import re
import shutil
import subprocess


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as ``gpu[003-010,012],cpu1`` -> ``gpu003``."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^(.*?)\[([^\]]+)\](.*)$", first)
    if not m:
        return first
    start = re.split(r"[-,]", m.group(2))[0]
    return f"{m.group(1)}{start}{m.group(3)}"


def setup_distributed_env(environ=os.environ) -> dict:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from Slurm when torchrun did not.

    Under ``srun`` every task is one rank; the first node of the allocation is the rendezvous host
    and the port is derived from the job id, so all tasks agree without talking first.
    """
    if "RANK" not in environ and "SLURM_PROCID" in environ:
        environ["RANK"] = environ["SLURM_PROCID"]
        environ["WORLD_SIZE"] = environ.get("SLURM_NTASKS", "1")
        environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
        # Slurm's values win over any exported by the submitting shell; the port stays below
        # Linux's ephemeral range (32768+) so it does not collide with outgoing connections
        environ["MASTER_ADDR"] = first_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        environ["MASTER_PORT"] = str(15000 + int(environ.get("SLURM_JOB_ID", "0")) % 15000)
    if "RANK" not in environ:  # a lone process (no launcher): DeepSpeed still asks for LOCAL_RANK
        environ.setdefault("LOCAL_RANK", "0")
    return {k: environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def cuda_environment(tensor_parallel: int, deterministic: bool = False, environ=os.environ) -> dict:
    """CUDA settings that must be in place before the first CUDA call of the process (set only
    where the user has not): the expandable-segments allocator, whose segments grow instead of
    fragmenting as micro-batch shapes change every step; under TP, one hardware queue, so a TP
    all-reduce is issued in program order and overlaps compute as megatron-core expects; and for
    deterministic runs, the fixed cuBLAS workspace that deterministic matmuls require."""
    environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if tensor_parallel > 1:
        environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if deterministic:
        environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return {
        k: environ.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF", "CUDA_DEVICE_MAX_CONNECTIONS", "CUBLAS_WORKSPACE_CONFIG")
    }
