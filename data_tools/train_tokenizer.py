"""``python -m data_tools train-tokenizer``: a byte-level BPE, [PAD] [CLS] [SEP] [MASK] [UNK] = 0..4.

The same as ``ettin data train-tokenizer`` (:mod:`ettin.data.commands`). Reads the same inputs
as ``prepare`` (see :mod:`ettin.data.inputs`) and saves one ``tokenizer.json``. The same
documents give the same file, byte for byte.
"""

from __future__ import annotations

import sys

from ettin.data.commands import add_train_tokenizer_parser
from ettin.errors import run_alone


def main(argv: list[str] | None = None) -> int:
    return run_alone(add_train_tokenizer_parser, "python -m data_tools.train_tokenizer", argv)


if __name__ == "__main__":
    sys.exit(main())
