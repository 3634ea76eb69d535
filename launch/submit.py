"""python -m launch.submit --sizes 17m,150m --objectives mlm,clm [--cross] --nodes N --gpus-per-node G ... (see --help)

The same command as ``ettin launch submit`` (one parser: :func:`ettin.launch.submit.add_submit_parser`), kept so
existing scripts go on working; installed with ettin, it runs from any folder.
"""

from __future__ import annotations

import sys

from ettin.launch.submit import main

if __name__ == "__main__":
    sys.exit(main())
