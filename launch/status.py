"""python -m launch.status [--run-root DIR] [--json]: job state, tokens done / planned, last checkpoint, last loss."""
from __future__ import annotations

import sys

from ettin.launch.status import status_main

if __name__ == "__main__":
    sys.exit(status_main())
