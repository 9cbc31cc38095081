"""Measure a model (per-layer time and memory) or the cluster (collective bandwidths)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    print("galvatron profile: not available yet in this version (see the Profiler issue)", file=sys.stderr)
    return 2
