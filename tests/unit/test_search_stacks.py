"""The search optimises what cost_plan reports under every software-stack description
(``CostOptions``: kernel fusion, master-weight layout, selective-recompute policy), not only the
default one."""

from __future__ import annotations

import pytest
from galvatron.strategies.cost import CostOptions, DatasheetPerf, cost_plan
from galvatron.strategies.hardware import load_cluster
from galvatron.strategies.search import SearchOptions
from galvatron.strategies.search.search import _Search

from galvatron.plan import CPKind, Recompute
from galvatron.spec import ModelSpec

TINY = {"name": "tiny3", "layers": 3, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn_hidden": 256, "vocab": 128,
        "seq_len": 32, "activation": "swiglu", "norm": "rmsnorm", "position": "rope"}

STACKS = [CostOptions(elementwise="eager", master_weights="params", selective="torchtitan"),
          CostOptions(elementwise="autocast", master_weights="params", selective="matmuls"),
          CostOptions(elementwise="fused", master_weights="optimizer", selective="megatron", persistent_grads=True)]


def _perf() -> DatasheetPerf:
    return DatasheetPerf(load_cluster({"name": "t", "gpu": "A100-80GB", "gpus_per_node": 2, "nodes": 2,
                                       "inter_node": "ib-hdr", "nics_per_node": 1}))


@pytest.mark.parametrize("stack", STACKS, ids=lambda o: f"{o.elementwise}-{o.master_weights}-{o.selective}")
def test_search_estimate_equals_cost_plan_for_each_stack(stack: CostOptions) -> None:
    spec = ModelSpec.from_config(TINY)
    options = SearchOptions(global_batch=4, cp_kinds=(CPKind.RING,), zero_stages=(0, 1, 2, 3), max_vpp=2,
                            recompute=tuple(Recompute), top_k=24)
    s = _Search(spec, _perf(), 4, options, stack)
    s.run()
    found = s.results()
    assert {p.stages[0].groups[0].strategy.zero for _, p in found} >= {0, 3}  # both ends of ZeRO compared
    for t, plan in found:
        assert t == pytest.approx(cost_plan(plan, spec, _perf(), stack).step_time_s, rel=1e-9), plan.describe()


def test_search_keys_zero_parts_by_accumulated_micro_batches() -> None:
    """Under autocast every micro-batch after the first adds its weight gradients into the kept ones, so
    a layer's ZeRO part depends on the step's micro-batch count: the search's cache must tell them apart
    (without the key, 49 of 65 plans here were mis-costed)."""
    spec = ModelSpec.from_config(TINY)
    stack = STACKS[1]
    options = SearchOptions(global_batch=8, cp_kinds=(), zero_stages=(0, 1), max_vpp=1, recompute=(Recompute.NONE,),
                            top_k=200)
    s = _Search(spec, _perf(), 4, options, stack)
    s.run()
    found = s.results()
    assert {p.num_micro_batches for _, p in found} >= {1, 2, 4, 8}
    for t, plan in found:
        assert t == pytest.approx(cost_plan(plan, spec, _perf(), stack).step_time_s, rel=1e-9), plan.describe()
