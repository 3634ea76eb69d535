"""Signals only raise a flag (contract 7, docs/DESIGN.md); the trainer reads it at step boundaries."""

from __future__ import annotations

import signal


class StopFlag:
    """Set by SIGUSR2 (Slurm's time-limit warning) and SIGTERM (preemption, scancel)."""

    def __init__(self):
        self.signal: str | None = None
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        self.signal = signal.Signals(signum).name
