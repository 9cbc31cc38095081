"""Cost a plan, or search the best one, for a model on a cluster, without GPUs."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    print("galvatron simulate: not available yet in this version (see the Simulation issue)", file=sys.stderr)
    return 2
