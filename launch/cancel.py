"""python -m launch.cancel [--run-root DIR] [--sizes ...] [--objectives ...] [--phases ...] [--runs KEY,...]"""
from __future__ import annotations

import sys

from ettin.launch.status import cancel_main

if __name__ == "__main__":
    sys.exit(cancel_main())
