"""Helpers for tests that need real process groups: spawn gloo ranks on this machine."""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist
import torch.multiprocessing as mp

from ettin.parallel import free_port


def run_distributed_test(
    fn, world_size: int, backend: str = "gloo", args: tuple = (), timeout_s: float = 300.0
) -> None:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks with torch.distributed initialized.

    ``fn`` must be importable (a module-level function); an exception on any rank fails the call.
    """
    mp.spawn(_worker, args=(fn, world_size, backend, free_port(), args, timeout_s), nprocs=world_size, join=True)


def _worker(rank, fn, world_size, backend, port, args, timeout_s):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        TORCH_CPP_LOG_LEVEL="ERROR",
    )
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(*args)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def write_mds_source(
    path,
    samples,
    compression: str | None = "zstd",
    size_limit: int = 1 << 14,
    stats: dict | None = None,
    hashes: tuple[str, ...] = ("xxh3_64",),
) -> None:
    """Write ``samples`` (lists of token ids) as a real MDS source folder with streaming's MDSWriter.

    Shards carry ``hashes`` in index.json as prepare writes them; ``hashes=()`` gives a folder
    without any, like some of Ettin's released ones."""
    import json
    from pathlib import Path

    import numpy as np
    from streaming import MDSWriter

    columns = {"input_ids": "ndarray:uint32", "id": "str"}
    with MDSWriter(
        out=str(path), columns=columns, compression=compression, size_limit=size_limit, hashes=list(hashes)
    ) as writer:
        for i, ids in enumerate(samples):
            writer.write({"input_ids": np.asarray(ids, dtype=np.uint32), "id": f"doc{i}#0"})
    tokens = int(sum(len(s) for s in samples))
    body = {"documents": len(samples), "chunks": len(samples), "tokens": tokens, **(stats or {})}
    (Path(path) / "stats.json").write_text(json.dumps(body))


def synthetic_corpus(
    n: int, vocab: int, seed: int, min_len: int = 8, max_len: int = 64, cls_id: int = 1, sep_id: int = 2
) -> list[list[int]]:
    """``n`` samples of random ordinary tokens wrapped [CLS] ... [SEP] (ids >= 5 are ordinary)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        body = rng.integers(5, vocab, rng.integers(min_len, max_len + 1)).tolist()
        out.append([cls_id, *body, sep_id])
    return out
