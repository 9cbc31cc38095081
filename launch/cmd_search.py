"""Search the fastest plan that fits in memory and write it as YAML.

``galvatron search --model llama2-7b --cluster 8xA100-80GB --out plan.yaml`` prints the best plan's
cost (as ``simulate`` does) and saves the plan for ``galvatron launch``. ``--backend deepspeed``
searches only plans that backend executes (its capability table in ``galvatron.backends``).
"""

from __future__ import annotations

import argparse

from galvatron.launch import cmd_simulate

from galvatron.spec import ModelSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cmd_simulate.add_arguments(parser)
    parser.add_argument("--out", metavar="FILE", help="write the best plan here as YAML")


def run(args: argparse.Namespace) -> int:
    spec = ModelSpec.from_config(args.model)
    cluster = cmd_simulate.load_cluster_arg(args.cluster)
    cmd_simulate.apply_backend(args, cluster)
    cmd_simulate.apply_profiles(args, spec, cluster)
    costs = cmd_simulate.search_and_emit(args, spec, cluster)
    if args.out:
        costs[0].plan.save(args.out)
        if not args.json:
            print(f"\nwrote {args.out}")
    return 0
