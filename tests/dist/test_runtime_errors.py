"""Failure behaviour of ``galvatron.wrap`` on gloo ranks: a plan that does not fit the world or
the model fails on every rank, fast, before any collective, naming the field; what the native
runtime cannot run yet is refused the same way; a collective whose peer never comes times out."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from galvatron.errors import GalvatronError, PlanError
from galvatron.plan import Plan
from galvatron.testing import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runtime_harness import BATCH, LAYERS, MODELS, batches, loss_fn, plan_dict, uniform

pytestmark = pytest.mark.slow

REFUSED = {
    "four-ranks-on-two": (Plan.uniform(LAYERS, global_batch_size=BATCH, dp=4), "gpt",
                          "stages: the plan needs 4 devices (4 over 1 pipeline stage(s)) but the world size is 2"),
    "tp-over-kv-heads": (uniform(2, tp=2), "gpt-kv1",
                         "stages[0].layers[0:4].tp: 2 does not divide the 1 key/value heads"),
    "context-parallel-mixed": (plan_dict(2, [{"range": [0, 2], "cp": 2}, {"range": [2, 4]}]), "gpt",
                               "stages[0].layers[2:4].cp: dp 2 x cp 1 x tp 1 differs from stages[0].layers[0:2]"),
    "expert-parallel-dense-block": (plan_dict(2, [{"range": [0, 1]}, {"range": [1, 2], "ep": 2}, {"range": [2, 4]}]),
                                    "gpt-moe", "stages[0].layers[1:2].ep: 2: layer 1 is not a MoE layer"),
    "fp8": (Plan.uniform(LAYERS, global_batch_size=BATCH, dp=2, dtype="fp8"), "gpt",
            "dtype: fp8 is not supported by the native runtime"),
    "tied-edges-differ": (Plan.from_dict({**uniform(2).to_dict(), "head": {"tp": 2}}), "gpt-tied",
                          "head: the model ties its input and output embeddings"),
    "zero-bubble-selective": (Plan.uniform(LAYERS, global_batch_size=BATCH, num_micro_batches=2, pp=2,
                                           schedule="zero-bubble", recompute="selective"), "gpt",
                              "stages[0].layers[0:2].recompute: selective recomputation under the zero-bubble"),
    "zero-bubble-full": (Plan.uniform(LAYERS, global_batch_size=BATCH, num_micro_batches=2, pp=2,
                                      schedule="zero-bubble", recompute="full"), "gpt",
                         "stages[0].layers[0:2].recompute: full recomputation under the zero-bubble schedule"),
}


def _model(name: str) -> torch.nn.Module:
    if name == "gpt-kv1":
        from galvatron.models.gpt import GPT, GPTConfig

        return GPT(GPTConfig(layers=LAYERS, hidden=32, heads=4, kv_heads=1, vocab=64, seq_len=8))
    return MODELS[name]()


def _refusals() -> dict[str, Any]:
    import galvatron
    from galvatron.runtime import mesh

    out: dict[str, Any] = {}
    for name, (plan, model, _) in REFUSED.items():
        start = time.monotonic()
        try:
            galvatron.wrap(_model(model), plan)
            out[name] = ("wrapped", 0.0, 0)
        except PlanError as err:
            out[name] = (str(err), time.monotonic() - start, len(mesh._GROUPS))
    model = galvatron.wrap(MODELS["gpt"](), uniform(2))
    try:
        galvatron.wrap(model, uniform(2))
        out["twice"] = "wrapped twice"
    except GalvatronError as err:
        out["twice"] = str(err)
    piped = galvatron.wrap(MODELS["gpt"](), Plan.uniform(LAYERS, global_batch_size=BATCH, num_micro_batches=2, pp=2))
    try:
        piped(torch.zeros(2, 8, dtype=torch.long))
        out["pipeline-forward"] = "ran"
    except GalvatronError as err:
        out["pipeline-forward"] = str(err)
    return out


@pytest.fixture(scope="module")
def refusals() -> list[dict[str, Any]]:
    start = time.monotonic()
    results = run_ranks(_refusals, 2, timeout=120)
    results.append({"launch_s": time.monotonic() - start})
    return results


@pytest.mark.parametrize("name", REFUSED)
def test_bad_plans_fail_on_every_rank_before_any_collective(refusals: list[dict[str, Any]], name: str) -> None:
    expected = REFUSED[name][2]
    for rank, result in enumerate(refusals[:-1]):
        message, seconds, groups = result[name]
        assert message.startswith(expected), f"rank {rank}: {message}"
        assert seconds < 10, f"rank {rank} took {seconds:.1f} s to refuse"
        assert groups == 0, f"rank {rank} created {groups} process groups before refusing"


def test_a_wrong_world_size_fails_everywhere_within_ten_seconds(refusals: list[dict[str, Any]]) -> None:
    # the whole launch (fork, process group, every refusal above, one real wrap) stays under 10 s of work
    assert all(r["four-ranks-on-two"][0].startswith("stages: the plan needs 4 devices") for r in refusals[:-1])
    assert refusals[-1]["launch_s"] < 30


def test_wrapping_twice_is_refused(refusals: list[dict[str, Any]]) -> None:
    for result in refusals[:-1]:
        assert "already wrapped" in result["twice"]


def test_a_pipelined_model_runs_through_train_step(refusals: list[dict[str, Any]]) -> None:
    for result in refusals[:-1]:
        assert "runs through model.train_step" in result["pipeline-forward"]


def _lonely_collective() -> tuple[str, float]:
    """Rank 1 leaves after wrapping; rank 0's next step must time out, not hang."""
    import galvatron

    model = galvatron.wrap(MODELS["gpt"](), uniform(2), timeout=timedelta(seconds=3))
    if dist.get_rank() == 1:
        return "left", 0.0
    tokens = torch.zeros(BATCH // 2, 8, dtype=torch.long)
    start = time.monotonic()
    try:
        model.train_step((tokens, tokens), loss_fn)
    except RuntimeError as err:
        return type(err).__name__, time.monotonic() - start
    return "finished", time.monotonic() - start


def test_a_collective_without_its_peer_times_out() -> None:
    outcome, seconds = run_ranks(_lonely_collective, 2, timeout=60)[0]
    assert outcome != "finished"
    assert seconds < 15


def _groups_after_exit() -> dict[str, bool]:
    """Train a step under ZeRO-3, destroy the default group and run galvatron's exit hook: which
    process groups are still alive (something holds them into the interpreter's finalization)."""
    import gc
    import weakref

    import galvatron
    from galvatron.runtime import mesh

    model = galvatron.wrap(MODELS["gpt"](), uniform(2, zero=3))
    optimizer = model.optimizer(torch.optim.AdamW, lr=1e-3)
    model.train_step(model.shard_batch(batches()[0]), loss_fn)
    optimizer.step()
    world = weakref.ref(dist.group.WORLD)
    ours = [weakref.ref(g) for g in mesh._GROUPS.values() if g is not None]
    del model, optimizer
    dist.destroy_process_group()
    gc.collect()
    before = [r() is not None for r in [world, *ours]]
    mesh._release_groups()
    after = [r() is not None for r in [world, *ours]]
    return {"world before the hook": before[0], "subgroups before": sum(before[1:]),
            "subgroups after": sum(after[1:]), "cached after": len(mesh._GROUPS)}


def test_process_groups_are_released_before_the_interpreter_finalizes() -> None:
    """galvatron holds the default group only weakly, so destroying it frees it, and an atexit hook
    lets its own groups go while the interpreter is whole: a gloo group freed during finalization
    frees its worker threads' leftover work there, which can abort the process
    (pytorch/pytorch#179291). (torch itself keeps some subgroups alive past destroy_process_group.)"""
    for rank in run_ranks(_groups_after_exit, 2, timeout=120):
        assert not rank["world before the hook"]
        assert rank["cached after"] == 0
        assert rank["subgroups after"] < rank["subgroups before"]
