"""python -m launch.submit --sizes 17m,150m --objectives mlm,clm [--cross] --nodes N --gpus-per-node G ... (see --help)"""
from __future__ import annotations

import sys

from ettin.launch.submit import main

if __name__ == "__main__":
    sys.exit(main())
