"""python -m launch.status [--run-root DIR] [--json]: job state, tokens done / planned, last checkpoint, last loss.

The same command as ``ettin launch status`` (one parser: :func:`ettin.launch.status.add_status_parser`), kept so
existing scripts go on working; installed with ettin, it runs from any folder.
"""

from __future__ import annotations

import sys

from ettin.launch.status import status_main

if __name__ == "__main__":
    sys.exit(status_main())
