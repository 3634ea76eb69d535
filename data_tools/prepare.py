"""``python -m data_tools prepare``: corpus files -> tokenized, chunked MDS shards + stats.json.

Chunking, ids, bad records and resuming are described in :mod:`ettin.data.prepare`.
"""
from __future__ import annotations

import argparse
import sys
import time

from data_tools import add_input_arguments
from ettin.data.prepare import DEFAULT_SEQ_LEN, format_report, prepare
from ettin.errors import EttinError, report


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Tokenize documents, chunk them ([CLS] ... [SEP], at most "
        "--seq-len tokens, never across documents) and write zstd MDS shards + stats.json. "
        "A killed run resumes when rerun with the same arguments.")
    add_input_arguments(p)
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output dataset directory")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="a local tokenizer.json (or a directory holding one)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, metavar="N",
                   help=f"tokens per sample, [CLS] and [SEP] included (default: "
                        f"{DEFAULT_SEQ_LEN}; the recipe also uses 7999)")
    p.add_argument("--cls-id", type=int, metavar="ID", help="default: the tokenizer's [CLS]")
    p.add_argument("--sep-id", type=int, metavar="ID", help="default: the tokenizer's [SEP]")
    p.add_argument("--shard-size", default="64mb", metavar="SIZE",
                   help="uncompressed bytes per shard, e.g. 64mb (default) or 1048576")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="tokenizer processes, one core each (default: 1); the output does not "
                        "depend on it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished or unfinished dataset in --out")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    started = time.perf_counter()
    try:
        stats = prepare(args.inputs, args.out, args.tokenizer, plain_text=args.plain_text,
                        include=args.include, seq_len=args.seq_len, text_field=args.text_field,
                        cls_id=args.cls_id, sep_id=args.sep_id, shard_size=args.shard_size,
                        workers=args.workers, overwrite=args.overwrite,
                        progress=not args.quiet and sys.stderr.isatty(), log=print)
    except EttinError as e:
        return report(e)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - started
    print(format_report(stats, args.out))
    print(f"done in {seconds:.1f} s ({stats['tokens'] / seconds:,.0f} tokens/s, "
          f"{stats['text_bytes'] / seconds / 1e6:.2f} MB/s of text)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
