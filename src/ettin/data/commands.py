"""``ettin data {prepare,train-tokenizer,inspect}``: the data tools' parsers and handlers.

:func:`add_data_parser` adds the ``data`` command to the ``ettin`` command line; each tool's
``add_<tool>_parser(subparsers)`` adds it alone, which the ``python -m data_tools …`` entry points run
through :func:`ettin.errors.run_alone` (the same flags, help and exit codes). Every handler takes the
parsed arguments and returns an exit code; a user mistake is raised as an
:class:`ettin.errors.EttinError`, which the caller's :func:`ettin.errors.run_reporting` prints as one
``error:`` line (exit 2). Building a parser imports nothing heavy (no torch, numpy, streaming, pyarrow
or tokenizers): the handlers import what they use.
"""

from __future__ import annotations

import argparse
import sys
import time

from ettin.data.inputs import input_suffixes
from ettin.data.prepare import DEFAULT_SEQ_LEN
from ettin.data.tokenizer import SPECIAL_TOKENS
from ettin.errors import EXIT_INTERRUPTED

DATA_HELP = "prepare corpora: tokenizer, MDS shards, inspection"
PREPARE_HELP = "corpus files -> tokenized MDS shards + stats.json"
TRAIN_TOKENIZER_HELP = "train a small byte-level BPE tokenizer"
INSPECT_HELP = "summarize an MDS dataset directory"
QUIET_HELP = "no progress bar (there is none when stderr is not a terminal)"


def _progress(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


# ---------------------------------------------------------------------------------------------
# Arguments


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """The corpus arguments ``prepare`` and ``train-tokenizer`` share."""
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help=f"{input_suffixes()} files, or directories holding them (walked recursively, in sorted order)",
    )
    p.add_argument(
        "--plain-text",
        action="extend",
        nargs="+",
        default=[],
        metavar="PATH",
        help="files, or directories whose every file, are one document each "
        "(e.g. --plain-text Lib/*.py; give INPUTs before it)",
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="only files whose name matches GLOB, when walking directories (repeatable; e.g. '*.py')",
    )
    p.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="the text field of JSONL records and parquet rows (default: text)",
    )


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output dataset directory")
    p.add_argument(
        "--tokenizer", required=True, metavar="PATH", help="a local tokenizer.json (or a directory holding one)"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        metavar="N",
        help=f"tokens per sample, [CLS] and [SEP] included (default: {DEFAULT_SEQ_LEN}; the recipe also uses 7999)",
    )
    p.add_argument("--cls-id", type=int, metavar="ID", help="default: the tokenizer's [CLS]")
    p.add_argument("--sep-id", type=int, metavar="ID", help="default: the tokenizer's [SEP]")
    p.add_argument(
        "--shard-size",
        default="64mb",
        metavar="SIZE",
        help="uncompressed bytes per shard, e.g. 64mb (default) or 1048576",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="tokenizer processes, one core each (default: 1); the output does not depend on it",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a finished or unfinished dataset in --out")
    p.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)


def add_train_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="the tokenizer.json to write")
    p.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        metavar="N",
        help="vocabulary size, special tokens included (at least 261)",
    )
    p.add_argument(
        "--min-frequency", type=int, default=2, metavar="N", help="merge only pairs seen at least N times (default: 2)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="the dataset directory (holds index.json)")
    p.add_argument(
        "--decode",
        type=int,
        default=1,
        metavar="N",
        help="show the first N samples (default: 1), decoded with --tokenizer",
    )
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json to decode samples with")
    p.add_argument(
        "--max-chars",
        type=int,
        default=400,
        metavar="N",
        help="cut each decoded sample after N characters (default: 400)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)


# ---------------------------------------------------------------------------------------------
# Handlers: parsed arguments -> exit code; user mistakes raise EttinError


def cmd_prepare(args) -> int:
    from ettin.data.prepare import format_report, prepare

    started = time.perf_counter()
    try:
        stats = prepare(
            args.inputs,
            args.out,
            args.tokenizer,
            plain_text=args.plain_text,
            include=args.include,
            seq_len=args.seq_len,
            text_field=args.text_field,
            cls_id=args.cls_id,
            sep_id=args.sep_id,
            shard_size=args.shard_size,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=_progress(args),
            log=print,
        )
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    seconds = time.perf_counter() - started
    print(format_report(stats, args.out))
    print(
        f"done in {seconds:.1f} s ({stats['tokens'] / seconds:,.0f} tokens/s, "
        f"{stats['text_bytes'] / seconds / 1e6:.2f} MB/s of text)"
    )
    return 0


def cmd_train_tokenizer(args) -> int:
    import hashlib
    from pathlib import Path

    from ettin.data.tokenizer import TokenizerError, train_tokenizer

    tokenizer, read = train_tokenizer(
        args.inputs,
        args.vocab_size,
        plain_text=args.plain_text,
        include=args.include,
        text_field=args.text_field,
        min_frequency=args.min_frequency,
        progress=_progress(args),
    )
    out = Path(args.out)
    if out.is_dir():
        raise TokenizerError(f"--out {out} is a directory; name the tokenizer.json file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    bad = sum(read.bad_records.values())
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    print(
        f"wrote {out}: vocab {tokenizer.get_vocab_size(with_added_tokens=True)}, trained on "
        f"{read.documents:,} documents ({read.text_bytes / 1e6:.1f} MB)"
        + (f", skipped {bad:,} bad records" if bad else "")
    )
    print(f"sha256 {sha}")
    return 0


def cmd_inspect(args) -> int:
    from ettin.data.summary import format_summary, summarize
    from ettin.data.tokenizer import load_tokenizer, tokenizer_identity

    tokenizer, sha = None, ""
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        sha = tokenizer_identity(args.tokenizer).sha256
    summary = summarize(args.directory, examples=max(args.decode, 0), progress=_progress(args))
    print(format_summary(summary, tokenizer, tokenizer_sha256=sha, max_chars=args.max_chars))
    return 0


# ---------------------------------------------------------------------------------------------
# The parsers: each adds its tool to ``subparsers`` and sets ``func`` to its handler


def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare",
        help=PREPARE_HELP,
        description="Tokenize documents, chunk them ([CLS] ... [SEP], at most --seq-len tokens, never across "
        "documents) and write zstd MDS shards + stats.json. A killed run resumes when rerun with "
        "the same arguments.",
    )
    add_prepare_arguments(p)
    p.set_defaults(func=cmd_prepare)
    return p


def add_train_tokenizer_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-tokenizer",
        help=TRAIN_TOKENIZER_HELP,
        description=f"Train a byte-level BPE tokenizer whose special tokens are {' '.join(SPECIAL_TOKENS)} = "
        f"ids 0..{len(SPECIAL_TOKENS) - 1}, and save tokenizer.json.",
    )
    add_train_tokenizer_arguments(p)
    p.set_defaults(func=cmd_train_tokenizer)
    return p


def add_inspect_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help=INSPECT_HELP,
        description="Summarize an MDS dataset directory (prepare --out): shards, samples, tokens, "
        "sample-length histogram, stats.json, and the first samples.",
    )
    add_inspect_arguments(p)
    p.set_defaults(func=cmd_inspect)
    return p


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``data {prepare,train-tokenizer,inspect}`` to ``subparsers`` (each sets ``func``)."""
    data = subparsers.add_parser("data", help=DATA_HELP, description=DATA_HELP)
    tools = data.add_subparsers(dest="action", required=True)
    add_prepare_parser(tools)
    add_train_tokenizer_parser(tools)
    add_inspect_parser(tools)
    return data
