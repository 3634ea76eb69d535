"""Logging for training processes: timestamped lines, rank 0 speaks, other ranks only warn.

Every process of a job writes to the same Slurm output file, so the other ranks stay quiet unless
something is wrong, and then they say which rank they are.
"""

from __future__ import annotations

import logging
import sys

FORMAT_MAIN = "%(asctime)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def setup_logging(rank: int = 0) -> logging.Logger:
    """Configure the ``ettin`` logger for this process (idempotent: a second call replaces the handler)."""
    log = logging.getLogger("ettin")
    for handler in list(log.handlers):
        if getattr(handler, "_ettin", False):
            log.removeHandler(handler)
    main = rank == 0
    handler = logging.StreamHandler(sys.stdout if main else sys.stderr)
    handler._ettin = True  # type: ignore[attr-defined]
    prefix = "" if main else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(FORMAT_MAIN.replace("%(message)s", prefix + "%(message)s"), DATE_FORMAT))
    log.addHandler(handler)
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.propagate = False
    return log
