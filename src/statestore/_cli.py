"""The ``statestore`` command line (standard library only: argparse)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statestore",
        description="Typed, crash-safe JSON state files shared by many processes.",
        epilog="Exit codes: 0 ok, 1 check failed, 2 usage error.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser(
        "demo",
        help="run N processes incrementing one counter and check that no update is lost",
        description="Start N real processes that each increment one counter K times "
        "through StateStore.update, then print the tally. Exit 1 if any update was lost.",
    )
    demo.add_argument("--processes", "-n", type=int, default=4, metavar="N")
    demo.add_argument("--updates", "-k", type=int, default=250, metavar="K")
    demo.add_argument("--dir", metavar="D", help="folder for the state file (default: a temp folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import demo_main

        if args.processes < 1 or args.updates < 1:
            parser.error("--processes and --updates must be at least 1")
        return demo_main(args.processes, args.updates, args.dir)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return EXIT_USAGE  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
