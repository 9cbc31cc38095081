"""Pipeline parallelism under ``galvatron.wrap``: every schedule, uneven and virtual stage
splits, and DP / ZeRO / TP + SP / mixed layer groups inside the stages, on 2 and 4 gloo ranks,
against single-process training (see test_runtime_harness)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from galvatron.plan import Plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runtime_harness import BATCH, LAYERS, Case, check

pytestmark = pytest.mark.slow

MICRO = 4


def pipeline(world: int, *, pp: int = 2, v: int = 1, schedule: str = "1f1b", split: list[int] | None = None,
             micro: int = MICRO, **strategy: Any) -> Plan:
    """A uniform pipeline plan over ``world`` ranks; dp fills each stage."""
    dp = world // pp // strategy.get("tp", 1)
    return Plan.uniform(LAYERS, global_batch_size=BATCH, num_micro_batches=micro, pp=pp, virtual_stages=v,
                        schedule=schedule, layer_split=split, dtype="fp32", dp=dp, **strategy)


def staged(stages: list[list[dict[str, Any]]], devices: int, **extra: Any) -> Plan:
    """A pipeline plan from per-stage lists of per-range overrides."""
    return Plan.from_dict({"global_batch_size": BATCH, "num_micro_batches": MICRO, "dtype": "fp32",
                           "stages": [{"devices": devices, "layers": layers} for layers in stages], **extra})


def _cases(world: int) -> list[Case]:
    cases = [
        Case("gpt-gpipe", "gpt", pipeline(world, schedule="gpipe")),
        Case("gpt-1f1b-uneven", "gpt", pipeline(world, split=[3, 1])),
        Case("gpt-1f1b-one-micro-batch", "gpt", pipeline(world, micro=1)),  # fewer than the stages: GPipe
        Case("gpt-interleaved", "gpt", pipeline(world, v=2, schedule="interleaved-1f1b")),
        Case("gpt-zero-bubble", "gpt", pipeline(world, v=2, schedule="zero-bubble")),
        Case("gpt-tied-1f1b", "gpt-tied", pipeline(world)),
        Case("llama-1f1b", "llama", pipeline(world, recompute="full")),
        # the embedding, and the norm and head, on chunks without blocks (Llama 3's layout)
        Case("gpt-tied-interleaved-edges", "gpt-tied", pipeline(world, v=2, schedule="interleaved-1f1b",
                                                                 split=[0, 2, 2, 0])),
    ]
    if world == 4:
        cases += [
            Case("gpt-dp-zero1", "gpt", pipeline(4, zero=1), adam=True),
            Case("gqa-tp-sp-zero3", "gpt-swiglu-gqa", pipeline(4, tp=2, sp=True, zero=3)),
            Case("gpt-tp-interleaved", "gpt", pipeline(4, v=2, schedule="interleaved-1f1b", tp=2)),
            Case("gpt-mixed-stages", "gpt", staged([
                [{"range": [0, 1]}, {"range": [1, 2], "tp": 2, "sp": True}],
                [{"range": [2, 3], "tp": 2, "zero": 3}, {"range": [3, 4], "zero": 1, "recompute": "selective"}]],
                devices=2, embedding={"tp": 2}, head={"tp": 1})),
            Case("gpt2-dp-zero1", "gpt2", pipeline(4, zero=1)),
            # tied embeddings across the stages: vocabulary-parallel ends, and FSDP-sharded ends
            Case("gpt-tied-tp-sp", "gpt-tied", pipeline(4, tp=2, sp=True)),
            Case("odd-vocab-tied-tp", "gpt-tied-odd-vocab", pipeline(4, tp=2)),
            Case("gpt-tied-zero3", "gpt-tied", pipeline(4, zero=3), adam=True),
            Case("gpt-tied-zero2-interleaved", "gpt-tied", pipeline(4, v=2, schedule="interleaved-1f1b", zero=2)),
            Case("mixtral-tp", "mixtral", pipeline(4, tp=2)),
            Case("moe-tp-interleaved", "gpt-moe", pipeline(4, v=2, schedule="interleaved-1f1b", tp=2)),
            Case("llama-tp-sp-zero1-edges", "llama", pipeline(4, v=2, schedule="interleaved-1f1b", split=[0, 2, 2, 0],
                                                              tp=2, sp=True, zero=1), adam=True),
        ]
    return cases


CASES = {world: _cases(world) for world in (2, 4)}


@pytest.mark.parametrize("world,case", [(w, c) for w, cs in CASES.items() for c in cs],
                         ids=[f"{w}ranks-{c.name}" for w, cs in CASES.items() for c in cs])
def test_pipelines_match_single_process(world: int, case: Case) -> None:
    check("pp", world, CASES[world], case)
