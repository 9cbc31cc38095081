"""The ``galvatron`` command. Each subcommand lives in its own module with two functions:
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them together."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from galvatron.errors import GalvatronError

# name -> (module under galvatron.launch, one-line help)
SUBCOMMANDS = {
    "simulate": ("cmd_simulate", "cost a plan, or search the best one, for a model on a cluster (no GPU needed)"),
    "search": ("cmd_search", "search the fastest plan that fits and write it as YAML"),
    "profile": ("cmd_profile", "measure a model (per-layer time, memory) or the cluster (collectives)"),
    "launch": ("cmd_launch", "run a training script under torchrun or Ray with a plan"),
    "plan": ("cmd_plan", "validate or show a plan file"),
    "demo": ("cmd_demo", "train the reference GPT on 4 local CPU workers through Ray with a searched plan"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="galvatron",
        description="Automatic hybrid parallelism for PyTorch training: profile, search, run.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        cmd = importlib.import_module(f"galvatron.launch.{module}")
        p = sub.add_parser(name, help=help_text, description=cmd.__doc__)
        cmd.add_arguments(p)
        p.set_defaults(handler=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except GalvatronError as err:
        print(f"galvatron {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
