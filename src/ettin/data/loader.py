"""The per-rank input pipeline: (step, micro-batch) -> a collated Batch, through a torch DataLoader.

Items are addressed, not streamed: micro-batch ``m`` of step ``s`` on data-parallel rank ``r`` is
a fixed slice of positions, so workers can build them in any order (the DataLoader hands them back
in order), the output never depends on the worker count, and resuming at step ``s`` just starts
the index there. Every rank of a step runs the same number of micro-batches (the largest rank
slice decides); a rank with fewer samples gets empty trailing micro-batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ettin.data.collate import Batch, Collator
from ettin.data.manifest import Manifest, build_manifest
from ettin.data.mds import MDSSource
from ettin.data.order import GlobalOrder
from ettin.data.schedule import BatchSchedule


@dataclass
class DataPipeline:
    """Everything that maps a step to samples: manifest, order, schedule, collator, readers."""

    manifest: Manifest
    readers: list[MDSSource]
    order: GlobalOrder
    schedule: BatchSchedule
    collator: Collator

    @classmethod
    def from_config(cls, cfg, cache_dir: str | None = None) -> "DataPipeline":
        manifest, readers = build_manifest(cfg.data, cfg.phase.seq_len, cache_dir)
        order = GlobalOrder([s.samples for s in manifest.sources], manifest.sample_shares(), cfg.phase.seed,
                            cfg.data.mixture_block, cfg.data.shuffle_block)
        return cls(manifest, readers, order, BatchSchedule.from_config(cfg), Collator.from_config(cfg))

    def samples(self, start: int, end: int) -> list[dict]:
        """The stored samples at positions ``start .. end-1``, with their source and index."""
        sources, indices = self.order(start, end)
        out = []
        for p, s, i in zip(range(start, end), sources.tolist(), indices.tolist()):
            row = self.readers[s][i]
            out.append({"position": p, "source": self.manifest.sources[s].name, "sample_index": i,
                        "id": row.get("id"), "input_ids": row["input_ids"]})
        return out

    def batch(self, start: int, end: int) -> Batch:
        sources, indices = self.order(start, end)
        ids = [self.readers[s].input_ids(i) for s, i in zip(sources.tolist(), indices.tolist())]
        return self.collator(ids, list(range(start, end)))


class MicroBatches(Dataset):
    """Item ``(step, m)``: micro-batch ``m`` of this data-parallel rank's slice of ``step``."""

    def __init__(self, pipeline: DataPipeline, micro_size: int, dp_rank: int = 0, dp_size: int = 1):
        self.pipeline, self.micro_size, self.dp_rank, self.dp_size = pipeline, micro_size, dp_rank, dp_size

    def micro_count(self, step: int) -> int:
        largest = math.ceil(self.pipeline.schedule.size(step) / self.dp_size)
        return math.ceil(largest / self.micro_size)

    def bounds(self, step: int, m: int) -> tuple[int, int]:
        start, end = self.pipeline.schedule.rank_bounds(step, self.dp_rank, self.dp_size)
        lo = min(end, start + m * self.micro_size)
        return lo, min(end, lo + self.micro_size)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, Batch]:
        step, m = key
        return step, m, self.pipeline.batch(*self.bounds(step, m))

    def __len__(self):  # addressed by (step, m); the sampler decides the range
        raise TypeError("MicroBatches is indexed by (step, micro) keys")


class StepSampler(Sampler):
    """Keys (step, m) for steps ``first .. last-1`` (forever when ``last`` is None)."""

    def __init__(self, dataset: MicroBatches, first: int, last: int | None = None):
        self.dataset, self.first, self.last = dataset, first, last

    def __iter__(self):
        step = self.first
        while self.last is None or step < self.last:
            for m in range(self.dataset.micro_count(step)):
                yield step, m
            step += 1


def _identity(x):
    return x


def build_loader(dataset: MicroBatches, first_step: int, last_step: int | None = None, workers: int = 2,
                 prefetch: int = 4) -> DataLoader:
    """A DataLoader yielding (step, m, Batch) from ``first_step``: the resume point is just an index."""
    return DataLoader(dataset, sampler=StepSampler(dataset, first_step, last_step), batch_size=None,
                      collate_fn=_identity, num_workers=workers, prefetch_factor=prefetch if workers else None,
                      persistent_workers=False)
