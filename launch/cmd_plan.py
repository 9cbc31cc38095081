"""Validate a plan file or print it readably: ``galvatron plan validate FILE [--world-size N]
[--model M]`` exits 0 with OK, or 1 with the field path of the first problem.
``galvatron plan show FILE --report report.html [--model M --cluster C]`` also writes a visual
report: the plan diagram, and with a model and a cluster its predicted timeline and memory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from galvatron.errors import GalvatronError
from galvatron.plan import Plan

if TYPE_CHECKING:
    from galvatron.spec import ModelSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plan_command", metavar="ACTION", required=True)
    for name, text in (("validate", "check plan files; print OK or the bad field's path"),
                       ("show", "print a plan's stages and per-layer strategies")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("files", nargs="+", metavar="FILE", help="plan YAML file(s)")
        p.add_argument("--world-size", type=int, help="also check the plan uses exactly this many devices")
        p.add_argument("--model", help="also check against a model: preset name or model YAML")
    show = sub.choices["show"]
    show.add_argument("--report", metavar="OUT", help="write a visual report of the plan (.html, or .png with "
                      "matplotlib); with --model and --cluster it includes predicted timeline and memory")
    show.add_argument("--cluster", help="cluster preset or YAML to cost the plan on for --report (needs --model)")


def run(args: argparse.Namespace) -> int:
    report = getattr(args, "report", None)
    if report and len(args.files) != 1:
        print("galvatron plan show: --report describes one plan; give one FILE", file=sys.stderr)
        return 2
    if getattr(args, "cluster", None) and not args.model:
        print("galvatron plan show: --cluster needs --model (the cost model needs both)", file=sys.stderr)
        return 2
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
        if report:
            print(f"report: {_write_report(plan, path, spec, args)}")
    return 1 if failed else 0


def _write_report(plan: Plan, path: str, spec: ModelSpec | None, args: argparse.Namespace) -> Path:
    """The report of one plan, costed when a model and a cluster are given."""
    from galvatron.report import CostSummary, Report, save_report

    context = {"plan": Path(path).name}
    cost = None
    if spec is not None and args.cluster:
        from galvatron.strategies.cost import cost_plan
        from galvatron.strategies.hardware import load_cluster

        cost = CostSummary.from_result(cost_plan(plan, spec, load_cluster(args.cluster)))
        context |= {"model": args.model, "cluster": args.cluster}
    return save_report(Report(plan=plan, cost=cost, title=f"galvatron plan report: {Path(path).name}",
                              context=context), args.report)
