"""python -m launch.cancel [--run-root DIR] [--sizes ...] [--objectives ...] [--phases ...] [--runs KEY,...]

The same command as ``ettin launch cancel`` (one parser: :func:`ettin.launch.status.add_cancel_parser`), kept so
existing scripts go on working; installed with ettin, it runs from any folder.
"""

from __future__ import annotations

import sys

from ettin.launch.status import cancel_main

if __name__ == "__main__":
    sys.exit(cancel_main())
