"""``python -m data_tools prepare``: corpus files -> tokenized, chunked MDS shards + stats.json.

The same as ``ettin data prepare`` (:mod:`ettin.data.commands`). Chunking, ids, bad records and
resuming are described in :mod:`ettin.data.prepare`.
"""

from __future__ import annotations

import sys

from ettin.data.commands import add_prepare_parser
from ettin.errors import run_alone


def main(argv: list[str] | None = None) -> int:
    return run_alone(add_prepare_parser, "python -m data_tools.prepare", argv)


if __name__ == "__main__":  # guarded: spawned workers import this module too
    sys.exit(main())
