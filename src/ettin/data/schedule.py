"""Batch boundaries: step -> [start, end) sample positions, a pure function (batch-size warmup included).

Ettin ramps the global batch at the start of pretraining. Here the ramp is ``stages`` equal
steps from ``start_size`` to ``global_size`` sequences, each stage covering ``warmup_samples /
stages`` samples (whole steps). The ramp is in samples, not tokens, so that the boundaries never
depend on the data (tokens are converted at ``seq_len`` per sample). Nor do they depend on the
number of GPUs: a data-parallel rank takes its share of each global batch by arithmetic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BatchSchedule:
    global_size: int
    warmup_samples: int = 0
    start_size: int = 1
    stages: int = 16
    _table: tuple = field(init=False, repr=False, compare=False)  # (first step, first position, size)

    def __post_init__(self):
        if self.global_size <= 0:
            raise ValueError(f"global batch size must be positive, got {self.global_size}")
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
    def from_config(cls, cfg) -> "BatchSchedule":
        b = cfg.batch
        return cls(b.global_size, b.warmup_tokens // cfg.phase.seq_len, b.warmup_start_size, b.warmup_stages)

    def _stage(self, step: int):
        for first_step, first_pos, size in reversed(self._table):
            if step >= first_step:
                return first_step, first_pos, size
        raise ValueError(f"step must be >= 0, got {step}")

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
        raise ValueError(f"position must be >= 0, got {position}")

    def rank_bounds(self, step: int, rank: int, world: int) -> tuple[int, int]:
        """Data-parallel rank ``rank`` of ``world`` takes a contiguous slice of the global batch."""
        start, end = self.bounds(step)
        n = end - start
        return start + n * rank // world, start + n * (rank + 1) // world
