"""Per-layer heterogeneous strategies inside one stage (different dp x tp layouts, ZeRO stages,
sequence parallelism, edges of their own) with the activation re-layout between them, and
activation recomputation (full, selective), under ``galvatron.wrap`` on 2 and 4 gloo ranks,
against single-process training (see test_runtime_harness)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runtime_harness import Case, check, plan_dict, uniform

pytestmark = pytest.mark.slow


def _cases(world: int) -> list[Case]:
    half = world // 2
    cases = [
        Case("gpt-recompute-full", "gpt", uniform(world, recompute="full")),
        Case("gqa-recompute-selective", "gpt-swiglu-gqa", uniform(world, recompute="selective")),
        Case("gpt-tp-sp-recompute-full-zero3", "gpt", uniform(world, tp=2, sp=True, recompute="full", zero=3)),
        Case("gpt-tp-recompute-selective", "gpt", uniform(world, tp=2, recompute="selective")),
        Case("gpt-dp-then-tp", "gpt", plan_dict(world, [{"range": [0, 2]}, {"range": [2, 4], "tp": 2}])),
        Case("gpt-mixed-zero-recompute", "gpt", plan_dict(world, [
            {"range": [0, 1], "zero": 3}, {"range": [1, 2], "zero": 1, "recompute": "full"},
            {"range": [2, 3], "tp": 2, "sp": True, "zero": 2}, {"range": [3, 4], "recompute": "selective"}],
            embedding={"tp": 2}, head={"tp": 2, "zero": 1})),
        Case("gqa-tp-sp-then-dp-plain-backward", "gpt-swiglu-gqa", plan_dict(world, [
            {"range": [0, 2], "tp": 2, "sp": True}, {"range": [2, 4], "zero": 2}], head={"tp": 2}), plain=True),
        Case("moe-tp-then-dp", "gpt-moe", plan_dict(world, [
            {"range": [0, 2], "tp": 2, "sp": True, "recompute": "full"}, {"range": [2, 4], "zero": 1}])),
    ]
    if world == 4:
        cases += [
            Case("gpt-tp4-dp2tp2-dp4", "gpt", plan_dict(4, [
                {"range": [0, 1], "tp": 4, "sp": True}, {"range": [1, 3], "tp": 2},
                {"range": [3, 4], "zero": 3}], embedding={"tp": 2}, head={"tp": 4})),
            Case("gpt-micro-batches-mixed", "gpt", plan_dict(4, [
                {"range": [0, 2], "tp": 2, "zero": 1}, {"range": [2, 4], "tp": 1, "zero": 2}],
                num_micro_batches=2, head={"tp": 2})),
        ]
    else:
        cases.append(Case("gpt-tp-dp-tp", "gpt", plan_dict(2, [
            {"range": [0, 1], "tp": 2}, {"range": [1, 3]}, {"range": [3, 4], "tp": 2, "sp": True}],
            embedding={"tp": 1}, head={"tp": half * 2})))
    return cases


CASES = {world: _cases(world) for world in (2, 4)}


@pytest.mark.parametrize("world,case", [(w, c) for w, cs in CASES.items() for c in cs],
                         ids=[f"{w}ranks-{c.name}" for w, cs in CASES.items() for c in cs])
def test_mixed_strategies_match_single_process(world: int, case: Case) -> None:
    check("mixed", world, CASES[world], case)
