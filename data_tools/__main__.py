"""``python -m data_tools TOOL ...``: dispatch to one tool of :mod:`ettin.data.commands`."""

from __future__ import annotations

import sys

from ettin.data.commands import COMMANDS, run_tool


def usage() -> str:
    lines = ["usage: python -m data_tools {" + ",".join(COMMANDS) + "} [--help] ...", "", "tools:"]
    lines += [f"  {name:<16} {command.about}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown tool {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_tool(argv[0], argv[1:], prog=f"python -m data_tools {argv[0]}")


if __name__ == "__main__":  # guarded: spawned workers import this module too
    sys.exit(main())
