"""``python -m data_tools inspect DIR``: shards, samples, tokens, a length histogram, stats.json
and decoded samples of an MDS dataset (see :mod:`ettin.data.summary`). Never writes into DIR.

The same as ``ettin data inspect`` (:mod:`ettin.data.commands`).
"""

from __future__ import annotations

import sys

from ettin.data.commands import add_inspect_parser
from ettin.errors import run_alone


def main(argv: list[str] | None = None) -> int:
    return run_alone(add_inspect_parser, "python -m data_tools.inspect", argv)


if __name__ == "__main__":
    sys.exit(main())
