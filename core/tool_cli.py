"""What the local tool commands (`feedloop store`, `feedloop registry`) share: an argparse parser
whose usage errors are exceptions (so each tool's main() keeps its own exit codes), and the parse
of `feedloop TOOL COMMAND [options]`."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """Bad flags or a missing command: the message is the whole line to print (exit 2)."""


class ToolParser(argparse.ArgumentParser):
    """argparse that reports usage errors as UsageError instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def parse_command(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv (argv[0] is the tool's name); UsageError when no command is chosen."""
    args = parser.parse_args(argv[1:])
    if args.command is None:
        raise UsageError(f"{parser.prog}: choose a command\n{parser.format_usage().strip()}")
    return args
