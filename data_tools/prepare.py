"""``python -m data_tools prepare``: corpus files -> tokenized, chunked MDS shards + stats.json.

The same as ``ettin data prepare`` (:mod:`ettin.data.commands`). Chunking, ids, bad records and
resuming are described in :mod:`ettin.data.prepare`.
"""

from __future__ import annotations

import sys

from ettin.data.commands import run_tool


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_tool("prepare", argv, prog)


if __name__ == "__main__":  # guarded: spawned workers import this module too
    sys.exit(main())
