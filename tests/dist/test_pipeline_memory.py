"""The activations an interleaved pipeline holds on the runtime, against the cost model's count.

Two gloo ranks run ``ScheduleInterleaved1F1B`` (2 x 2 chunks, 8 micro-batches) over three splits of 5
blocks; each rank measures the bytes autograd holds for backward (``profiler.saved_bytes``) and every
chunk's bytes per micro-batch. The cost model's rule (each chunk held for as long as the schedule keeps
it: ``chunk_in_flight``, ``peak_activations``) must give each rank's measured peak; the rule it
replaced (in-flight micro-batches times the group's bytes) misses it where chunks differ.
"""

from __future__ import annotations

from typing import Any

import pytest

from galvatron.plan import Schedule
from galvatron.testing import run_ranks

pytestmark = pytest.mark.slow

SPLITS = [(2, 1, 1, 1), (1, 1, 1, 2), (0, 3, 2, 0)]
MICRO, SAMPLES, SEQ, VOCAB = 8, 2, 64, 128


def _rank(splits: list[tuple[int, ...]]) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from galvatron.models.gpt import GPT, GPTConfig
    from galvatron.plan import Plan
    from galvatron.profiler.saved_bytes import pipeline_activations
    from galvatron.runtime.pipeline import PipelineRunner, split_stages

    torch.set_num_threads(1)
    tokens = torch.randint(0, VOCAB, (MICRO * SAMPLES, SEQ + 1), generator=torch.Generator().manual_seed(1))
    out = []
    for split in splits:
        torch.manual_seed(0)
        model = GPT(GPTConfig(layers=sum(split), hidden=32, heads=4, vocab=VOCAB, seq_len=SEQ, activation="swiglu",
                              norm="rmsnorm"))
        plan = Plan.uniform(sum(split), global_batch_size=MICRO * SAMPLES, num_micro_batches=MICRO, pp=2,
                            schedule="interleaved-1f1b", virtual_stages=2, layer_split=list(split), dtype="fp32")
        chunks = split_stages(model, "blocks", plan, dist.get_rank())
        runner = PipelineRunner(chunks, plan, dist.group.WORLD,
                                lambda y, t: F.cross_entropy(y.flatten(0, 1), t.flatten()), "cpu")
        out.append(pipeline_activations(runner, chunks, tokens[:, :-1], tokens[:, 1:], MICRO))
    return out


def test_interleaved_activations_follow_the_schedule_chunk_by_chunk() -> None:
    from galvatron.strategies.cost.step import chunk_in_flight, in_flight, peak_activations

    ranks = run_ranks(_rank, 2, SPLITS, timeout=300)
    group_rule_misses = 0
    for i, split in enumerate(SPLITS):
        for g, measured in enumerate(r[i] for r in ranks):
            assert measured["left"] == 0, (split, g)  # nothing kept past the step
            chunks = measured["per_chunk"]
            rule = peak_activations(chunk_in_flight(Schedule.INTERLEAVED_1F1B, 2, 2, MICRO, g), chunks)
            assert rule == pytest.approx(measured["peak"], rel=0.01), (split, g)
            before = in_flight(Schedule.INTERLEAVED_1F1B, 2, 2, MICRO, g) * sum(chunks)
            group_rule_misses += abs(before / measured["peak"] - 1) > 0.1
    assert group_rule_misses >= 3
