"""Command-line data tools: ``python -m data_tools {prepare,train-tokenizer,inspect} ...``.

Thin argparse front ends over :mod:`ettin.data.prepare`, :mod:`ettin.data.tokenizer` and
:mod:`ettin.data.summary`. Each tool also runs alone (``python -m data_tools.prepare``); every
user mistake ends as one ``error: ...`` line and exit code 2.
"""


def add_input_arguments(p) -> None:
    """The corpus arguments ``prepare`` and ``train-tokenizer`` share."""
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help=".jsonl, .jsonl.gz, .jsonl.zst, .parquet or .txt files, or directories "
                        "holding them (walked recursively, in sorted order)")
    p.add_argument("--plain-text", action="extend", nargs="+", default=[], metavar="PATH",
                   help="files, or directories whose every file, are one document each "
                        "(e.g. --plain-text Lib/*.py; give INPUTs before it)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only files whose name matches GLOB, when walking directories "
                        "(repeatable; e.g. '*.py')")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="the text field of JSONL records and parquet rows (default: text)")
