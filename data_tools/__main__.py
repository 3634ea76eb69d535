"""``python -m data_tools TOOL ...``: dispatch to one tool of :mod:`ettin.data.commands`."""

from __future__ import annotations

import sys

from ettin.data.commands import (
    INSPECT_HELP,
    PREPARE_HELP,
    TRAIN_TOKENIZER_HELP,
    add_inspect_parser,
    add_prepare_parser,
    add_train_tokenizer_parser,
)
from ettin.errors import EXIT_OK, EXIT_USAGE, run_alone

TOOLS = {  # name: (add_parser, the line in the usage)
    "prepare": (add_prepare_parser, PREPARE_HELP),
    "train-tokenizer": (add_train_tokenizer_parser, TRAIN_TOKENIZER_HELP),
    "inspect": (add_inspect_parser, INSPECT_HELP),
}


def usage() -> str:
    lines = ["usage: python -m data_tools {" + ",".join(TOOLS) + "} [--help] ...", "", "tools:"]
    lines += [f"  {name:<16} {about}" for name, (_, about) in TOOLS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return EXIT_OK
    if argv[0] not in TOOLS:
        print(f"error: unknown tool {argv[0]!r}; choose one of {', '.join(TOOLS)}", file=sys.stderr)
        return EXIT_USAGE
    return run_alone(TOOLS[argv[0]][0], f"python -m data_tools {argv[0]}", argv[1:])


if __name__ == "__main__":  # guarded: spawned workers import this module too
    sys.exit(main())
