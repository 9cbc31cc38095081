"""Tensor parallelism (with and without Megatron sequence parallelism, vocabulary-parallel
embedding and head, derived / user / MoE expert plans) under ``galvatron.wrap`` on 2 and 4 gloo
ranks, against single-process training (see test_runtime_harness)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runtime_harness import Case, check, plan_dict, uniform

pytestmark = pytest.mark.slow

ATTENTION_ONLY = {"attn.q_proj": "colwise", "attn.k_proj": "colwise", "attn.v_proj": "colwise",
                  "attn.o_proj": "rowwise"}


def _cases(world: int) -> list[Case]:
    cases = [
        Case("gpt-tp", "gpt", uniform(world, tp=2)),
        Case("gpt-tp-sp", "gpt", uniform(world, tp=2, sp=True)),
        Case("gpt-tp-sp-plain-backward", "gpt", uniform(world, tp=2, sp=True), plain=True),
        Case("gqa-tp-sp-zero1", "gpt-swiglu-gqa", uniform(world, tp=2, sp=True, zero=1)),
        Case("gqa-tp-zero3", "gpt-swiglu-gqa", uniform(world, tp=2, zero=3)),
        Case("gpt-tp-sp-zero2-adam", "gpt", uniform(world, tp=2, sp=True, zero=2), adam=True),
        Case("gpt-tp-attention-only", "gpt", uniform(world, tp=2), tp_plan=ATTENTION_ONLY),
        Case("moe-tp-sp", "gpt-moe", uniform(world, tp=2, sp=True)),
        Case("odd-vocab-tp-sp", "gpt-tied-odd-vocab", uniform(world, tp=2, sp=True)),
        Case("odd-vocab-tp-plain-backward", "gpt-tied-odd-vocab", uniform(world, tp=2), plain=True),
        Case("gpt-tp-replicated-edges", "gpt",
             plan_dict(world, [{"range": [0, 4], "tp": 2}], embedding={"tp": 1}, head={"tp": 1})),
    ]
    if world == 4:
        cases += [
            Case("gpt-tp4-sp", "gpt", uniform(4, tp=4, sp=True)),
            Case("gpt-tp4-zero1", "gpt", uniform(4, tp=4, zero=1)),
        ]
    return cases


CASES = {world: _cases(world) for world in (2, 4)}


@pytest.mark.parametrize("world,case", [(w, c) for w, cs in CASES.items() for c in cs],
                         ids=[f"{w}ranks-{c.name}" for w, cs in CASES.items() for c in cs])
def test_tensor_parallel_matches_single_process(world: int, case: Case) -> None:
    check("tp", world, CASES[world], case)
