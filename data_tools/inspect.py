"""``python -m data_tools inspect DIR``: shards, samples, tokens, a length histogram, stats.json
and decoded samples of an MDS dataset (see :mod:`ettin.data.summary`). Never writes into DIR.
"""
from __future__ import annotations

import argparse
import sys

from ettin.data.summary import format_summary, summarize
from ettin.data.tokenizer import load_tokenizer, tokenizer_identity
from ettin.errors import EttinError, report


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Summarize an MDS dataset directory (prepare --out): shards, "
        "samples, tokens, sample-length histogram, stats.json, and the first samples.")
    p.add_argument("directory", metavar="DIR", help="the dataset directory (holds index.json)")
    p.add_argument("--decode", type=int, default=1, metavar="N",
                   help="show the first N samples (default: 1), decoded with --tokenizer")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json to decode samples with")
    p.add_argument("--max-chars", type=int, default=400, metavar="N",
                   help="cut each decoded sample after N characters (default: 400)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        tokenizer, sha = None, ""
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
            sha = tokenizer_identity(args.tokenizer).sha256
        summary = summarize(args.directory, examples=max(args.decode, 0),
                            progress=not args.quiet and sys.stderr.isatty())
    except EttinError as e:
        return report(e)
    print(format_summary(summary, tokenizer, tokenizer_sha256=sha, max_chars=args.max_chars))
    return 0


if __name__ == "__main__":
    sys.exit(main())
