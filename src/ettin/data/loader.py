"""The per-rank input pipeline: step -> this rank's collated Batch, through a torch DataLoader.

Items are addressed, not streamed: step ``s`` on data-parallel rank ``r`` is a fixed slice of
positions, so workers can build them in any order (the DataLoader hands them back in order), the
output never depends on the worker count, and resuming at step ``s`` just starts the index there.
The trainer cuts each item into micro-batches by a token budget (``Batch.micro_batches``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from ettin.data.collate import Batch, Collator, mlm_kernel
from ettin.data.manifest import Manifest, build_manifest
from ettin.data.mds import DataError, MDSSource
from ettin.data.order import GlobalOrder, HeldOut, derive_key, validation_count, validation_settings
from ettin.data.schedule import BatchSchedule


@dataclass
class DataPipeline:
    """Everything that maps a step to samples: manifest, order, schedule, collator, readers."""

    manifest: Manifest
    readers: list[MDSSource]
    order: GlobalOrder
    schedule: BatchSchedule
    collator: Collator
    held_out: HeldOut  # each source's validation part; the order draws from the rest

    @classmethod
    def from_config(cls, cfg, cache_dir: str | None = None) -> DataPipeline:
        manifest, readers = build_manifest(cfg.data, cfg.phase.seq_len, cache_dir)
        held_out = held_out_of(cfg, manifest)
        order = GlobalOrder(
            held_out.training_samples(),
            manifest.sample_shares(),
            cfg.phase.seed,
            cfg.data.mixture_block,
            cfg.data.shuffle_block,
        )
        # the batch ramp is counted in real tokens: converted to samples at the mixture's mean (stats.json)
        schedule = BatchSchedule.from_config(cfg, manifest.mean_tokens_per_sample())
        return cls(manifest, readers, order, schedule, Collator.from_config(cfg), held_out)

    def locate(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """(source ids, stored sample indices) at positions ``start .. end-1`` of the training order."""
        sources, indices = self.order(start, end)
        for s in np.unique(sources).tolist():
            sel = sources == s
            indices[sel] = self.held_out.stored_index(s, indices[sel])
        return sources, indices

    def samples(self, start: int, end: int) -> list[dict]:
        """The stored samples at positions ``start .. end-1``, with their source and index."""
        sources, indices = self.locate(start, end)
        out = []
        for p, s, i in zip(range(start, end), sources.tolist(), indices.tolist()):
            row = self.readers[s][i]
            out.append(
                {
                    "position": p,
                    "source": self.manifest.sources[s].name,
                    "sample_index": i,
                    "id": row.get("id"),
                    "input_ids": row["input_ids"],
                }
            )
        return out

    def batch(self, start: int, end: int) -> Batch:
        sources, indices = self.locate(start, end)
        ids: list = [None] * len(sources)
        for s in np.unique(sources).tolist():
            which = np.flatnonzero(sources == s)
            for w, sample in zip(which.tolist(), self.readers[s].input_ids_many(indices[which])):
                ids[w] = sample
        return self.collator(ids, list(range(start, end)))


def held_out_of(cfg, manifest: Manifest) -> HeldOut:
    """The validation part of each source (data.validation, or the source's own setting)."""
    settings = validation_settings(cfg.data)
    counts = []
    for source in manifest.sources:
        count = validation_count(settings.get(source.name, cfg.data.validation), source.samples)
        if count >= source.samples:
            raise DataError(
                f"source '{source.name}': a validation part of {count} leaves none of its "
                f"{source.samples} samples to train on; lower data.validation"
            )
        counts.append(count)
    keys = [derive_key(cfg.eval.seed, s.name, s.samples, "validation") for s in manifest.sources]
    return HeldOut([s.samples for s in manifest.sources], counts, keys)


class RankSteps(Dataset):
    """Item ``step``: this data-parallel rank's slice of the step, collated in one go.

    A whole step per item keeps the per-call costs (order lookups, numpy dispatch, the hand-over
    between processes) to one per step instead of one per micro-batch; the receiving process cuts
    it into micro-batches, which are views."""

    def __init__(self, pipeline: DataPipeline, dp_rank: int = 0, dp_size: int = 1):
        self.pipeline, self.dp_rank, self.dp_size = pipeline, dp_rank, dp_size
        if pipeline.collator.masks:
            mlm_kernel()  # compile (or load) here, before the workers fork, not once in every worker

    def __getitem__(self, step: int) -> tuple[int, Batch]:
        return step, self.pipeline.batch(*self.pipeline.schedule.rank_bounds(step, self.dp_rank, self.dp_size))

    def __len__(self):  # addressed by step; the sampler decides the range
        raise TypeError("RankSteps is indexed by step")


class StepSampler(Sampler):
    """Steps ``first .. last-1`` (forever when ``last`` is None)."""

    def __init__(self, first: int, last: int | None = None):
        self.first, self.last = first, last

    def __iter__(self):
        return iter(range(self.first, self.last)) if self.last is not None else itertools.count(self.first)


def _identity(x):
    return x


def build_loader(
    dataset: RankSteps,
    first_step: int,
    last_step: int | None = None,
    workers: int = 2,
    prefetch: int = 2,
    pin_memory: bool = False,
) -> Iterator[tuple[int, Batch]]:
    """(step, this rank's batch) from ``first_step`` on: the resume point is just an index.
    ``pin_memory`` (for a GPU) page-locks each batch in the loader's pin thread."""
    loader = DataLoader(
        dataset,
        sampler=StepSampler(first_step, last_step),
        batch_size=None,
        collate_fn=_identity,
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
    return iter(loader)
