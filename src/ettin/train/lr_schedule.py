"""The learning-rate schedule of a phase (config ``lr_schedule``; docs/RECIPE.md "Per phase").

Not the batch-size schedule (ettin.data.schedule, ``batch.*``): this one scales ``optim.lr`` by
the real tokens done in the phase. A linear warmup from 0 to ``start_factor`` over
``warmup_tokens``, then the shape named by ``lr_schedule.shape``, one of :data:`SHAPES`.

A shape is a function ``(tokens, lrs, phase_tokens) -> factor``, called after the warmup with
the phase's tokens so far (``warmup_tokens <= tokens <= phase_tokens``) and the
``LRScheduleConfig``. Adding one is one entry in :data:`SHAPES`; the config accepts every name
there. Nothing here imports torch (ettin.config validates against :data:`SHAPES`).
"""

from __future__ import annotations

import math
from collections.abc import Callable


def constant(t: float, s, phase_tokens: int) -> float:
    return s.start_factor


def one_minus_sqrt(t: float, s, phase_tokens: int) -> float:
    """From start_factor to end_factor along 1 - sqrt(progress) over the tokens after the warmup."""
    span = max(phase_tokens - s.warmup_tokens, 1)
    return s.end_factor + (s.start_factor - s.end_factor) * (1 - math.sqrt((t - s.warmup_tokens) / span))


def wsd(t: float, s, phase_tokens: int) -> float:
    """Warmup-stable-decay: start_factor, then linear to end_factor over the last decay_tokens."""
    decay_start = phase_tokens - s.decay_tokens
    if t < decay_start or s.decay_tokens == 0:
        return s.start_factor
    return s.start_factor + (s.end_factor - s.start_factor) * (t - decay_start) / s.decay_tokens


SHAPES: dict[str, Callable[[float, object, int], float]] = {
    "constant": constant,
    "one_minus_sqrt": one_minus_sqrt,
    "wsd": wsd,
}


def lr_factor(tokens: float, lrs, phase_tokens: int) -> float:
    """LR as a fraction of optim.lr after ``tokens`` real tokens of the phase (``lrs``: an
    ``LRScheduleConfig``)."""
    t = min(max(tokens, 0.0), phase_tokens)
    warmup = lrs.warmup_tokens
    if warmup and t < warmup:
        return lrs.start_factor * t / warmup
    shape = SHAPES.get(lrs.shape)
    if shape is None:
        raise ValueError(f"unknown lr_schedule.shape '{lrs.shape}' (known: {', '.join(SHAPES)})")
    return shape(t, lrs, phase_tokens)
