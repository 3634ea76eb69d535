"""python -m launch.cancel [--run-root DIR] [--sizes ...] [--objectives ...] [--phases ...] [--runs KEY,...]

The same command as ``ettin launch cancel`` (one parser: :func:`ettin.launch.status.add_cancel_parser`), kept so
existing scripts go on working; installed with ettin, it runs from any folder.
"""

from __future__ import annotations

import sys

from ettin.launch import run_alone
from ettin.launch.status import add_cancel_parser

if __name__ == "__main__":
    sys.exit(run_alone(add_cancel_parser, "python -m launch.cancel"))
