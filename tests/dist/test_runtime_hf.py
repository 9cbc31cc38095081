"""Tiny Hugging Face GPT-2 (tied embeddings, fused qkv Conv1D), Llama (GQA, its own TP plan)
and Mixtral (fused experts kept replicated under TP) under ``galvatron.wrap`` on 2 and 4 gloo
ranks, against single-process training (see test_runtime_harness)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from galvatron.runtime import tensor

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runtime_harness import Case, check, plan_dict, uniform

pytestmark = pytest.mark.slow


def _cases(world: int) -> list[Case]:
    cases = []
    for model in ("gpt2", "llama", "mixtral"):
        cases += [
            Case(f"{model}-dp-plain-backward", model, uniform(world), plain=True),
            Case(f"{model}-zero1", model, uniform(world, zero=1)),
            Case(f"{model}-zero3-recompute-full", model, uniform(world, zero=3, recompute="full")),
            Case(f"{model}-tp-sp", model, uniform(world, tp=2, sp=True)),
            Case(f"{model}-tp-zero2-selective", model, uniform(world, tp=2, zero=2, recompute="selective")),
            Case(f"{model}-mixed", model, plan_dict(world, [
                {"range": [0, 2], "tp": 2, "sp": True}, {"range": [2, 4], "zero": 1}], head={"tp": 1, "zero": 1},
                embedding={"tp": 1, "zero": 1})),
        ]
    if tensor.torch_version() < tensor.PACKED_MIN_TORCH:  # GPT-2's fused c_attn cannot be split there
        cases = [c for c in cases if not (c.model == "gpt2" and any(g.strategy.tp > 1 for g in c.plan.groups()))]
    return cases


CASES = {world: _cases(world) for world in (2, 4)}


@pytest.mark.parametrize("world,case", [(w, c) for w, cs in CASES.items() for c in cs],
                         ids=[f"{w}ranks-{c.name}" for w, cs in CASES.items() for c in cs])
def test_hugging_face_models_match_single_process(world: int, case: Case) -> None:
    check("hf", world, CASES[world], case)
