"""Data parallelism and ZeRO 0-3 (with CPU offload) under ``galvatron.wrap``, on 2 and 4 gloo
ranks, against single-process training of the reference GPTs (see test_runtime_harness)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from galvatron.plan import Plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runtime_harness import Case, check, total_params, uniform

pytestmark = pytest.mark.slow


def _cases(world: int) -> list[Case]:
    cases = []
    for model in ("gpt", "gpt-swiglu-gqa"):
        cases += [Case(f"{model}-zero{z}", model, uniform(world, zero=z)) for z in range(4)]
    cases += [
        Case("gpt-dp-plain-backward", "gpt", uniform(world), plain=True),
        Case("gpt-zero3-plain-backward", "gpt", uniform(world, zero=3), plain=True),
        Case("gpt-zero1-adam", "gpt", uniform(world, zero=1), adam=True),
        Case("gpt-zero1-offload", "gpt", uniform(world, zero=1, offload=True)),
        Case("gpt-zero3-offload-adam", "gpt", uniform(world, zero=3, offload=True), adam=True),
        Case("gpt-tied-zero2", "gpt-tied", uniform(world, zero=2)),
        Case("gpt-tied-zero1-micro", "gpt-tied", Plan.from_dict({**uniform(world, zero=1).to_dict(),
                                                                 "num_micro_batches": 2})),
    ]
    return cases


CASES = {world: _cases(world) for world in (2, 4)}


@pytest.mark.parametrize("world,case", [(w, c) for w, cs in CASES.items() for c in cs],
                         ids=[f"{w}ranks-{c.name}" for w, cs in CASES.items() for c in cs])
def test_data_parallel_matches_single_process(world: int, case: Case) -> None:
    result = check("dp", world, CASES[world], case)
    total = total_params(case.model)
    zero = case.plan.stages[0].groups[0].strategy.zero
    if zero >= 2:  # parameters sharded over the data-parallel ranks
        assert result["stored"] < total / world * 1.5
    else:
        assert result["stored"] == total
    if zero == 1 and case.adam:  # two Adam moments of a 1/dp slice (+ a step count per piece)
        assert result["opt_state"] < 2 * total / world * 1.5
