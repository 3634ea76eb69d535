"""``python -m data_tools train-tokenizer``: a byte-level BPE, [PAD] [CLS] [SEP] [MASK] [UNK] = 0..4.

Reads the same inputs as ``prepare`` (see :mod:`ettin.data.prepare`) and saves one
``tokenizer.json``. The same documents give the same file, byte for byte.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from data_tools import add_input_arguments
from ettin.data.tokenizer import SPECIAL_TOKENS, TokenizerError, train_tokenizer
from ettin.errors import EttinError, report


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train a byte-level BPE tokenizer whose special tokens are "
        f"{' '.join(SPECIAL_TOKENS)} = ids 0..{len(SPECIAL_TOKENS) - 1}, and save tokenizer.json.")
    add_input_arguments(p)
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="the tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="vocabulary size, special tokens included (at least 261)")
    p.add_argument("--min-frequency", type=int, default=2, metavar="N",
                   help="merge only pairs seen at least N times (default: 2)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        tokenizer, read = train_tokenizer(args.inputs, args.vocab_size,
                                          plain_text=args.plain_text, include=args.include,
                                          text_field=args.text_field,
                                          min_frequency=args.min_frequency,
                                          progress=not args.quiet and sys.stderr.isatty())
        out = Path(args.out)
        if out.is_dir():
            raise TokenizerError(f"--out {out} is a directory; name the tokenizer.json file")
        out.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(out))
    except EttinError as e:
        return report(e)
    bad = sum(read.bad_records.values())
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out}: vocab {tokenizer.get_vocab_size(with_added_tokens=True)}, trained on "
          f"{read.documents:,} documents ({read.text_bytes / 1e6:.1f} MB)"
          + (f", skipped {bad:,} bad records" if bad else ""))
    print(f"sha256 {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
