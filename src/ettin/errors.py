"""One error family for everything raised on purpose about user input.

A config key, a data file, a checkpoint, a Slurm answer: when the user can fix it, the code raises
an :class:`EttinError` (or a subclass) whose ``str()`` names the thing and the fix. Every entry
point catches this family only, prints ``error: <message>`` and exits 2 (:func:`report`). Anything
else is a bug in ettin and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import TextIO

# exit codes of the entry points (here, not in ettin.train.trainer: the torch-free launch tools
# read them too, e.g. the Slurm job script's requeue rule in ettin.launch.slurm_job)
EXIT_OK = 0
EXIT_USAGE = 2  # bad input: one error line, nothing lost
EXIT_NONFINITE = 3  # ettin train: a non-finite loss stopped the run (nothing saved)
EXIT_REQUEUE = 75  # ettin train: stopped early after saving; 75 = EX_TEMPFAIL: "try again"
EXIT_INTERRUPTED = 130  # ettin data prepare: Ctrl-C (128 + SIGINT); rerunning resumes


class EttinError(Exception):
    """A mistake the user can fix; ``str()`` names the key, file or shard and what to do."""


# A DataLoader worker re-raises its exception with the worker's traceback folded into the
# message; its last line is "package.module.ClassName: message".
_WORKER_LAST_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)+[A-Za-z_]\w*: ")


def error_lines(e: BaseException) -> list[str]:
    """The lines to show the user for ``e``: its message, without a worker's traceback or class path."""
    text = str(e)
    lines = [line for line in text.splitlines() if line.strip()] or [type(e).__name__]
    if "Original Traceback" in text:
        lines = [_WORKER_LAST_LINE.sub("", lines[-1])]
    return lines


def report(e: BaseException, file: TextIO | None = None) -> int:
    """Print ``e`` as ``error:`` lines and return :data:`EXIT_USAGE`."""
    for line in error_lines(e):
        print(f"error: {line}", file=file or sys.stderr)
    return EXIT_USAGE


def run_reporting(main: Callable[[], int]) -> int:
    """Run an entry point: an :class:`EttinError` becomes one error line and exit 2."""
    try:
        return main()
    except EttinError as e:
        return report(e)


def run_alone(
    add_parser: Callable[[argparse._SubParsersAction], argparse.ArgumentParser],
    prog: str,
    argv: list[str] | None = None,
) -> int:
    """Run one subcommand as its own program, e.g. ``python -m launch.submit`` or ``python -m data_tools prepare``.

    ``add_parser(subparsers)`` is the very function that adds the command to the ``ettin`` command line (and
    sets ``func``), so the two spellings cannot drift apart in flags, help or exit codes: only ``prog``, the
    name in the usage line, differs. The handler runs under :func:`run_reporting`.
    """
    parser = add_parser(argparse.ArgumentParser(prog=prog).add_subparsers())
    parser.prog = prog
    args = parser.parse_args(argv)
    return run_reporting(lambda: args.func(args))
