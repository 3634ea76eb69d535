"""Helpers for tests that need real process groups: spawn gloo ranks on this machine."""
from __future__ import annotations

import datetime
import os

import torch.distributed as dist
import torch.multiprocessing as mp

from ettin.parallel import free_port


def run_distributed_test(fn, world_size: int, backend: str = "gloo", args: tuple = (), timeout_s: float = 300.0) -> None:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks with torch.distributed initialized.

    ``fn`` must be importable (a module-level function); an exception on any rank fails the call.
    """
    mp.spawn(_worker, args=(fn, world_size, backend, free_port(), args, timeout_s), nprocs=world_size, join=True)


def _worker(rank, fn, world_size, backend, port, args, timeout_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), TORCH_CPP_LOG_LEVEL="ERROR")
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(*args)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
