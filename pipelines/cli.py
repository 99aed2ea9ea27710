"""The `maskedkd` command line.

Each package owns its subcommands and adds them here through a `register(subparsers)`
function. Handlers import their heavy dependencies (torch, ray) lazily, so `--help`
stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import pipelines.commands
import student_trainer.cli
import teacher_service.cli


def build_parser() -> argparse.ArgumentParser:
    """Build the `maskedkd` parser with every package's subcommands."""
    parser = argparse.ArgumentParser(
        prog="maskedkd",
        description=(
            "Distil vision transformers from a shared teacher that runs only on the "
            "patches each student attends to (MaskedKD)."
        ),
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level for all maskedkd modules (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    teacher_service.cli.register(subparsers)
    student_trainer.cli.register(subparsers)
    pipelines.commands.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `maskedkd` subcommand and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
