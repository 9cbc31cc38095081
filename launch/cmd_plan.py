"""Validate a plan file or print it readably: ``galvatron plan validate FILE [--world-size N]
[--model M]`` exits 0 with OK, or 1 with the field path of the first problem."""

from __future__ import annotations

import argparse
import sys

from galvatron.errors import GalvatronError
from galvatron.plan import Plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plan_command", metavar="ACTION", required=True)
    for name, text in (("validate", "check plan files; print OK or the bad field's path"),
                       ("show", "print a plan's stages and per-layer strategies")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("files", nargs="+", metavar="FILE", help="plan YAML file(s)")
        p.add_argument("--world-size", type=int, help="also check the plan uses exactly this many devices")
        p.add_argument("--model", help="also check against a model: preset name or model YAML")


def run(args: argparse.Namespace) -> int:
    spec = None
    if args.model:
        from galvatron.spec import ModelSpec

        spec = ModelSpec.from_config(args.model)
    failed = 0
    for path in args.files:
        try:
            plan = Plan.load(path).validate(args.world_size, spec)
        except (GalvatronError, OSError) as err:
            print(f"{path}: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: OK" if args.plan_command == "validate" else f"{path}\n{plan.describe()}")
    return 1 if failed else 0
