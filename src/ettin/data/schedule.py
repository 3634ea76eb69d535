"""Batch boundaries: step -> [start, end) sample positions, a pure function (batch-size warmup included).

Ettin ramps the global batch at the start of pretraining (and of the cross-objective phase). Here
the ramp is ``stages`` equal steps from ``start_size`` to ``global_size`` sequences, each stage
covering ``warmup_samples / stages`` samples (whole steps). The boundaries are kept in samples, so
they are a pure function of a few integers: not of the number of GPUs (a data-parallel rank takes
its share of each global batch by arithmetic), and not of the tokens actually read.

The recipe gives the ramp in tokens (``batch.warmup_tokens``, real tokens, padding excluded). It
becomes samples through one data-derived constant, ``tokens_per_sample``: the phase mixture's mean
tokens per sample, from the sources' ``stats.json`` (``Manifest.mean_tokens_per_sample``). The
constant is rounded to 6 decimals, so that every machine derives the same ``warmup_samples``, and it
is part of the ledger's order key: a resume on data with another mean is refused. Without data
(``ettin plan``) or without token counts, a sample is taken as ``seq_len`` tokens, which ends the
ramp early in real tokens whenever samples are shorter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from ettin.errors import EttinError


@dataclass(frozen=True)
class BatchSchedule:
    global_size: int
    warmup_samples: int = 0
    start_size: int = 1
    stages: int = 16
    # tokens per sample that converted the ramp's tokens to ``warmup_samples`` (None: no ramp)
    tokens_per_sample: float | None = None
    _table: tuple = field(init=False, repr=False, compare=False)  # (first step, first position, size)

    def __post_init__(self):
        if self.global_size <= 0:
            raise EttinError(f"global batch size must be positive, got {self.global_size}")
        table, step, pos = [], 0, 0
        if self.warmup_samples > 0:
            start = max(1, min(self.start_size, self.global_size))
            for i in range(self.stages):
                size = start + (self.global_size - start) * i // self.stages
                steps = math.ceil(self.warmup_samples / self.stages / size)
                table.append((step, pos, size))
                step, pos = step + steps, pos + steps * size
        table.append((step, pos, self.global_size))
        object.__setattr__(self, "_table", tuple(table))

    @classmethod
    def from_config(cls, cfg, tokens_per_sample: float | None = None) -> BatchSchedule:
        """The schedule of ``cfg``. ``tokens_per_sample``: the data's mean tokens per sample
        (``Manifest.mean_tokens_per_sample``; ``DataPipeline.from_config`` passes it); None takes
        ``phase.seq_len``, for a plan without data."""
        b = cfg.batch
        if b.warmup_tokens <= 0:
            return cls(b.global_size, 0, b.warmup_start_size, b.warmup_stages)
        per_sample = cfg.phase.seq_len if tokens_per_sample is None else tokens_per_sample
        if not per_sample > 0:
            raise EttinError(f"tokens per sample must be positive, got {per_sample}")
        return cls(
            b.global_size, warmup_samples(b.warmup_tokens, per_sample), b.warmup_start_size, b.warmup_stages, per_sample
        )

    def _stage(self, step: int):
        for first_step, first_pos, size in reversed(self._table):
            if step >= first_step:
                return first_step, first_pos, size
        raise EttinError(f"step must be >= 0, got {step}")

    def size(self, step: int) -> int:
        return self._stage(step)[2]

    def bounds(self, step: int) -> tuple[int, int]:
        first_step, first_pos, size = self._stage(step)
        start = first_pos + (step - first_step) * size
        return start, start + size

    def step_at(self, position: int) -> int:
        """The step whose batch holds ``position``."""
        for first_step, first_pos, size in reversed(self._table):
            if position >= first_pos:
                return first_step + (position - first_pos) // size
        raise EttinError(f"position must be >= 0, got {position}")

    def rank_bounds(self, step: int, rank: int, world: int) -> tuple[int, int]:
        """Data-parallel rank ``rank`` of ``world`` takes a contiguous slice of the global batch."""
        start, end = self.bounds(step)
        n = end - start
        return start + n * rank // world, start + n * (rank + 1) // world

    def ramp(self) -> list[tuple[int, int, int, int]]:
        """The ramp's stages as (batch size, first step, steps, first position); the full batch,
        from the last stage's end on, is not listed. Empty without a ramp."""
        rows = self._table
        return [(size, step, rows[i + 1][0] - step, pos) for i, (step, pos, size) in enumerate(rows[:-1])]


def warmup_samples(warmup_tokens: int, tokens_per_sample: float) -> int:
    """Samples of the ramp: enough to hold ``warmup_tokens`` at ``tokens_per_sample`` each (exact arithmetic)."""
    return math.ceil(Fraction(warmup_tokens) / Fraction(tokens_per_sample))
