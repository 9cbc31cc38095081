"""Properties of the cost model that must hold whatever the hardware numbers are."""

from __future__ import annotations

import pytest
from galvatron.strategies.cost import CostOptions, DatasheetPerf, LayerContext, cost_plan, layer_cost
from galvatron.strategies.cost.step import in_flight
from galvatron.strategies.hardware import load_cluster

from galvatron.errors import PlanError
from galvatron.plan import DType, LayerStrategy, Plan, Schedule
from galvatron.spec import ModelSpec
from galvatron.spec_config import load_model_config

SPEC = ModelSpec.from_config("llama2-7b")


def _cost(cluster: str = "8xA100-80GB", **kw: object):
    pp = int(kw.pop("pp", 1))  # type: ignore[arg-type]
    m = int(kw.pop("m", 1))  # type: ignore[arg-type]
    g = int(kw.pop("g", 8))  # type: ignore[arg-type]
    kw.setdefault("dp", 8 // (pp * int(kw.get("tp", 1))))  # type: ignore[arg-type]
    plan = Plan.uniform(SPEC.num_blocks, global_batch_size=g, num_micro_batches=m, pp=pp, **kw)
    return cost_plan(plan, SPEC, load_cluster(cluster))


def test_zero_stages_shrink_static_memory_in_order() -> None:
    mems = [_cost(zero=z).stages[0].memory_gib for z in range(4)]
    static = [m["params"] + m["grads"] + m["optimizer"] for m in mems]
    assert static == sorted(static, reverse=True) and static[0] > 2 * static[3]


def test_recompute_trades_time_for_activation_memory() -> None:
    none, full = _cost(zero=3, recompute="none"), _cost(zero=3, recompute="full")
    assert full.step_time_s > none.step_time_s
    assert full.stages[0].memory_gib["activations"] < none.stages[0].memory_gib["activations"] / 5


def test_tensor_parallel_splits_parameters() -> None:
    assert _cost(tp=8, dp=1).stages[0].memory_gib["params"] == pytest.approx(
        _cost(tp=1).stages[0].memory_gib["params"] / 8, rel=0.02)


def test_bubble_follows_narayanan_formula_for_uniform_stages() -> None:
    cost = _cost(pp=4, tp=2, dp=1, m=8, g=8, cluster="8xA100-80GB")
    busy = 8 * max(s.compute_s + sum(s.comm_s[k] for k in ("tp", "pp")) for s in cost.stages) / 8
    # (pp - 1) / m of the ideal time, within what unequal edge stages (embedding, head) add
    assert cost.step_time_s > busy * (1 + 3 / 8) * 0.9


def test_in_flight_micro_batches_per_schedule() -> None:
    assert in_flight(Schedule.GPIPE, 4, 1, 8, 0) == 8
    assert [in_flight(Schedule.ONE_F_ONE_B, 4, 1, 8, g) for g in range(4)] == [4, 3, 2, 1]
    assert in_flight(Schedule.INTERLEAVED_1F1B, 4, 2, 8, 0) == pytest.approx(4 + 3 / 2)


def test_striped_ring_beats_contiguous_ring_under_causal_mask() -> None:
    long = ModelSpec.from_config({**load_model_config("llama2-7b"), "seq_len": 65536})
    perf = DatasheetPerf(load_cluster("8xH100"))
    ctx = LayerContext(perf=perf, options=CostOptions(), dtype=DType.BF16, seq_len=long.seq_len, causal=True,
                       micro_batch=1, stage_devices=8)
    block = long.blocks[0]
    ring = layer_cost(ctx, block, LayerStrategy(dp=1, cp=8, cp_kind="ring"))
    striped = layer_cost(ctx, block, LayerStrategy(dp=1, cp=8, cp_kind="striped"))
    assert striped.fwd + striped.bwd < ring.fwd + ring.bwd


def test_cost_plan_rejects_plans_that_do_not_match_the_cluster() -> None:
    plan = Plan.uniform(SPEC.num_blocks, global_batch_size=8, tp=2, dp=2)
    with pytest.raises(PlanError, match="world size"):
        cost_plan(plan, SPEC, load_cluster("8xA100-80GB"))


def test_korthikanti_table4_per_layer_times_within_ten_percent() -> None:
    """22B GPT layer, TP 8, micro-batch 4 on an A100 80GB node (Korthikanti et al. 2022 Table 4)."""
    spec = ModelSpec.from_config({"name": "gpt22b", "layers": 48, "hidden": 6144, "heads": 64, "vocab": 51200,
                                  "seq_len": 2048, "activation": "gelu", "norm": "layernorm", "bias": True,
                                  "position": "learned"})
    opts = CostOptions(flash_attention=False, dropout=True)
    ctx = LayerContext(perf=DatasheetPerf(load_cluster("selene")), options=opts, dtype=DType.BF16, seq_len=2048,
                       causal=True, micro_batch=4, stage_devices=8)
    for recompute, published in (("none", 19.6), ("full", 27.2), ("selective", 20.9)):
        c = layer_cost(ctx, spec.blocks[0], LayerStrategy(dp=1, tp=8, recompute=recompute))
        assert (c.fwd + c.bwd) * 1e3 == pytest.approx(published, rel=0.10)
