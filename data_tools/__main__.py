"""``python -m data_tools TOOL ...``: dispatch to one tool's ``main``."""
from __future__ import annotations

import importlib
import sys

TOOLS = {
    "prepare": ("data_tools.prepare", "corpus files -> tokenized MDS shards + stats.json"),
    "train-tokenizer": ("data_tools.train_tokenizer", "train a small byte-level BPE tokenizer"),
    "inspect": ("data_tools.inspect", "summarize an MDS dataset directory"),
}


def usage() -> str:
    lines = ["usage: python -m data_tools {" + ",".join(TOOLS) + "} [--help] ...", "", "tools:"]
    lines += [f"  {name:<16} {about}" for name, (_, about) in TOOLS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    tool = TOOLS.get(argv[0])
    if tool is None:
        print(f"error: unknown tool {argv[0]!r}; choose one of {', '.join(TOOLS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(tool[0])
    return module.main(argv[1:], prog=f"python -m data_tools {argv[0]}")


if __name__ == "__main__":  # guarded: spawned workers import this module too
    sys.exit(main())
