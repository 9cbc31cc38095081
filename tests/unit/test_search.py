"""The search's best plan equals brute force's best on instances small enough to enumerate."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
from galvatron.strategies.cost import CostOptions, DatasheetPerf, cost_plan
from galvatron.strategies.hardware import load_cluster
from galvatron.strategies.search import SearchOptions, search
from galvatron.strategies.search.brute import all_plans, brute_force, with_memory
from galvatron.strategies.search.search import _Search

from galvatron.errors import MemoryBudgetError
from galvatron.plan import CPKind, Recompute, Schedule
from galvatron.spec import ModelSpec

TINY = {"name": "tiny3", "layers": 3, "hidden": 64, "heads": 4, "ffn_hidden": 256, "vocab": 128, "seq_len": 32,
        "activation": "swiglu"}


MOE = {"name": "tinymoe", "layers": 3, "hidden": 64, "heads": 4, "ffn_hidden": 256, "vocab": 128, "seq_len": 32,
       "activation": "swiglu", "moe": {"experts": 4, "top_k": 2, "ffn_hidden": 64, "first_dense": 1}}


def _perf(world: int) -> DatasheetPerf:
    return DatasheetPerf(load_cluster({"name": "t", "gpu": "A100-80GB", "gpus_per_node": 2, "nodes": world // 2,
                                       "inter_node": "ib-hdr", "nics_per_node": 1}))


def _options(**kw: object) -> SearchOptions:
    base = dict(global_batch=4, cp_kinds=(CPKind.RING, CPKind.STRIPED), zero_stages=(0, 3), max_vpp=2,
                recompute=(Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL),
                capabilities=frozenset({"pp", "tp", "sp", "cp:ring", "cp:striped", "zero3", "recompute:full",
                                        "recompute:selective", "schedule:1f1b", "schedule:zero-bubble",
                                        "schedule:interleaved-1f1b"}))
    base.update(kw)
    return SearchOptions(**base)  # type: ignore[arg-type]


def _binding(spec: ModelSpec, options: SearchOptions) -> tuple[DatasheetPerf, list]:
    """A memory limit that rules out about half the plans (so memory shapes the answer), and the
    brute-force plans that fit it, fastest first."""
    every = brute_force(spec, with_memory(_perf(4), 1e9), options, world=4)
    budget = statistics.median(c.peak_memory_gib for c in every)
    return with_memory(_perf(4), budget), [c for c in every if c.peak_memory_gib <= budget]


@pytest.mark.parametrize("uniform", [False, True])
def test_search_matches_brute_force(uniform: bool) -> None:
    spec = ModelSpec.from_config(TINY)
    options = _options(uniform=uniform)
    perf, truth = _binding(spec, options)
    found = search(spec, perf, options, world_size=4)
    assert truth, "the budget must leave some plans"
    assert found.best.step_time_s == pytest.approx(truth[0].step_time_s, rel=1e-9)
    assert found.best.fits


def test_search_matches_brute_force_with_blocking_p2p() -> None:
    """CPU workers' blocking pipeline handoffs (both stages pay): the search ranks pipelines as
    cost_plan prices them, and the handoffs cost more than on one side."""
    from galvatron.strategies.cost import CostOptions

    @dataclasses.dataclass(frozen=True)
    class SlowHandoffs(DatasheetPerf):  # gloo-like: where a 100 us handoff is paid changes the ranking
        def p2p_time(self, nbytes: float, inter_node: bool) -> float:
            return 1e-4 if nbytes > 0 else 0.0

    def perf(gib: float) -> SlowHandoffs:
        return SlowHandoffs(with_memory(_perf(4), gib).cluster)

    spec = ModelSpec.from_config(TINY)
    options = _options(zero_stages=(0,), cp_kinds=(), top_k=8)
    blocking = CostOptions(blocking_p2p=True)
    every = brute_force(spec, perf(1e9), options, world=4, cost_options=blocking)
    # a budget just under the leanest plan without a pipeline: the answer is a pipeline
    budget = 0.999 * min(c.peak_memory_gib for c in every if c.plan.pp == 1)
    truth = [c for c in every if c.peak_memory_gib <= budget]
    found = search(spec, perf(budget), options, blocking, world_size=4)
    assert found.best.plan.pp > 1 and found.best.step_time_s == pytest.approx(truth[0].step_time_s, rel=1e-9)
    times = [c.step_time_s for c in found.top]
    assert times == sorted(times) and times[1] == pytest.approx(truth[1].step_time_s, rel=1e-9)
    one_side = cost_plan(found.best.plan, spec, perf(1e9))
    both = cost_plan(found.best.plan, spec, perf(1e9), blocking)
    assert sum(s.comm_s["pp"] for s in both.stages) > sum(s.comm_s["pp"] for s in one_side.stages)


def test_search_matches_brute_force_on_the_native_stack() -> None:
    """The native runtime's costs: blocks that FSDP2 holds (ZeRO-2/3) run their elementwise ops and
    keep activations in 16 bits, the others under autocast, so the search's per-layer cache must tell
    them apart."""
    from galvatron.backends import capabilities

    native = CostOptions(**capabilities("native").cost_options())
    spec = ModelSpec.from_config(TINY)
    options = _options(zero_stages=(0, 1, 2, 3), cp_kinds=(), max_vpp=1, capabilities=frozenset(
        {"pp", "tp", "sp", "zero1", "zero2", "zero3", "recompute:full", "schedule:1f1b"}),
        recompute=(Recompute.NONE, Recompute.FULL))
    every = brute_force(spec, with_memory(_perf(4), 1e9), options, world=4, cost_options=native)
    budget = statistics.median(c.peak_memory_gib for c in every)
    truth = [c for c in every if c.peak_memory_gib <= budget]
    found = search(spec, with_memory(_perf(4), budget), options, native, world_size=4)
    assert found.best.step_time_s == pytest.approx(truth[0].step_time_s, rel=1e-9)
    again = cost_plan(found.best.plan, spec, with_memory(_perf(4), budget), native)
    assert (found.best.step_time_s, found.best.peak_memory_gib) == pytest.approx(
        (again.step_time_s, again.peak_memory_gib), rel=1e-9)


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
def test_search_matches_brute_force_on_the_native_stack_with_tp_recomputation(quantile: float) -> None:
    """The native runtime's TP blocks that recompute do not hold autocast's weight casts
    (``strategies.cost.layer.recasts``), which depends on each candidate's recompute mode: the search must price it
    as cost_plan does, at budgets where it decides which plans fit."""
    from galvatron.backends import capabilities

    native = CostOptions(**capabilities("native").cost_options())
    spec = ModelSpec.from_config(TINY)
    options = _options(zero_stages=(0, 1), cp_kinds=(), max_vpp=1, capabilities=frozenset(
        {"tp", "sp", "zero1", "recompute:selective", "recompute:full", "schedule:1f1b"}),
        recompute=(Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL))
    every = brute_force(spec, with_memory(_perf(4), 1e9), options, world=4, cost_options=native)
    budget = sorted(c.peak_memory_gib for c in every)[int(quantile * (len(every) - 1))]
    truth = [c for c in every if c.peak_memory_gib <= budget]
    found = search(spec, with_memory(_perf(4), budget), options, native, world_size=4)
    assert found.best.step_time_s == pytest.approx(truth[0].step_time_s, rel=1e-9)


def test_search_recomputes_some_blocks_of_a_single_stage() -> None:
    """Without a pipeline, a plan may recompute only its first blocks fully: at a budget between the
    plans that recompute none and all, the search finds the fastest such plan, as brute force does."""
    spec = ModelSpec.from_config(TINY)
    options = _options(max_pp=1, cp_kinds=(), zero_stages=(0,), recompute=(Recompute.NONE, Recompute.FULL),
                       capabilities=frozenset({"tp", "recompute:full", "schedule:1f1b"}))
    every = brute_force(spec, with_memory(_perf(4), 1e9), options, world=4)
    partial = [c for c in every if 0 < sum(g.strategy.recompute is Recompute.FULL for g in c.plan.groups()) and
               any(g.strategy.recompute is Recompute.NONE for g in c.plan.groups())]
    budget = min(c.peak_memory_gib for c in partial)
    truth = [c for c in every if c.peak_memory_gib <= budget]
    assert truth[0] in partial, "the budget must make a partly recomputed plan the fastest"
    found = search(spec, with_memory(_perf(4), budget), options, world_size=4)
    assert found.best.step_time_s == pytest.approx(truth[0].step_time_s, rel=1e-9)


def test_search_prices_the_tied_gradient_sum_as_cost_plan_does() -> None:
    """Tied embeddings on one stage add the embedding's second gradient after the backward
    (``tied_gradient_sum``: a third of these plans peak there): at every budget the search ranks and
    fits plans as cost_plan prices them."""
    from galvatron.backends import capabilities

    native = CostOptions(**capabilities("native").cost_options())
    spec = ModelSpec.from_config({**TINY, "vocab": 16384, "hidden": 128, "ffn_hidden": 512, "tied_embeddings": True})
    options = _options(zero_stages=(0, 1), cp_kinds=(), max_vpp=1, max_pp=1, capabilities=frozenset(
        {"tp", "zero1", "recompute:full", "schedule:1f1b"}), recompute=(Recompute.NONE, Recompute.FULL))
    every = brute_force(spec, with_memory(_perf(4), 1e9), options, world=4, cost_options=native)
    for budget in sorted({c.peak_memory_gib for c in every}):
        truth = [c for c in every if c.peak_memory_gib <= budget]
        found = search(spec, with_memory(_perf(4), budget), options, native, world_size=4)
        assert found.best.step_time_s == pytest.approx(truth[0].step_time_s, rel=1e-9)
        assert found.best.peak_memory_gib <= budget * (1 + 1e-9)


def test_search_matches_brute_force_on_mixed_moe_blocks() -> None:
    """Blocks that differ (a dense first block, then MoE) take the non-homogeneous path; ep is searched."""
    spec = ModelSpec.from_config(MOE)
    assert len({b.experts for b in spec.blocks}) == 2
    caps = frozenset({"pp", "tp", "ep", "zero3", "recompute:full", "recompute:selective", "schedule:1f1b",
                      "schedule:zero-bubble"})
    options = _options(capabilities=caps, cp_kinds=(), schedules=(Schedule.ONE_F_ONE_B, Schedule.ZERO_BUBBLE))
    perf, truth = _binding(spec, options)
    found = search(spec, perf, options, world_size=4)
    assert found.best.step_time_s == pytest.approx(truth[0].step_time_s, rel=1e-9)
    assert any(g.strategy.ep > 1 for c in truth for g in c.plan.groups()), "ep must be in the space"


def test_search_matches_brute_force_with_expert_tp() -> None:
    """Expert TP other than tp (MoE Parallel Folding) is searched on MoE blocks only, with SP; the vectorised
    search agrees with brute force (cost_plan per plan) over that space."""
    spec = ModelSpec.from_config(MOE)
    caps = frozenset({"tp", "sp", "ep", "etp", "zero3", "recompute:full", "schedule:1f1b"})
    options = _options(capabilities=caps, cp_kinds=(), schedules=(Schedule.ONE_F_ONE_B,), max_pp=1,
                       recompute=(Recompute.NONE, Recompute.FULL))
    perf, truth = _binding(spec, options)
    found = search(spec, perf, options, world_size=4)
    assert found.best.step_time_s == pytest.approx(truth[0].step_time_s, rel=1e-9)
    folded = [g.strategy for c in truth for g in c.plan.groups() if g.strategy.etp]
    assert folded and all(s.sp and s.etp < s.tp for s in folded), "etp must be in the space, with sp"
    assert all(spec.blocks[g.start].experts for c in truth for g in c.plan.groups() if g.strategy.etp)
    pinned = search(spec, perf, _options(**{**options.__dict__, "fixed": {"etp": 1, "tp": 2}}), world_size=4)
    assert {g.strategy.etp for g in pinned.best.plan.groups() if g.start > 0} == {1}
    s = _Search(spec, perf, 4, _options(**{**options.__dict__, "top_k": 40}), CostOptions())
    s.run()
    kept = s.results()
    assert any(g.strategy.etp for _, plan in kept for g in plan.groups())
    for t, plan in kept:
        assert t == pytest.approx(cost_plan(plan, spec, perf).step_time_s, rel=1e-9)


@pytest.mark.parametrize(("config", "fixed", "cost"), [
    (TINY, {}, CostOptions()), (MOE, {}, CostOptions()), ({**TINY, "tied_embeddings": True}, {"pp": 2}, CostOptions()),
    (TINY, {"pp": 2}, CostOptions(pipeline_action_s=2e-4, blocking_p2p=True)),
    (TINY, {"pp": 2, "vpp": 2}, CostOptions(overlap_p2p=True))])
def test_search_estimate_equals_cost_plan(config: dict, fixed: dict, cost: CostOptions) -> None:
    """What the search optimises internally is what cost_plan reports, for every plan it keeps
    (tied embeddings across pipeline stages, CPU workers' schedule overhead and blocking handoffs, and
    interleaved handoffs beside their chunks' compute, included)."""
    spec = ModelSpec.from_config(config)
    options = _options(top_k=8, fixed=fixed)
    s = _Search(spec, _perf(4), 4, options, cost)
    s.run()
    found = s.results()
    assert len(found) == 8
    for t, plan in found:
        assert t == pytest.approx(cost_plan(plan, spec, _perf(4), cost).step_time_s, rel=1e-9)


def test_top_k_matches_brute_force_order() -> None:
    spec = ModelSpec.from_config(TINY)
    options = _options(top_k=3, schedules=(Schedule.ONE_F_ONE_B,))
    perf, truth = _binding(spec, options)
    found = search(spec, perf, options, world_size=4)
    assert found.top[0].step_time_s == pytest.approx(truth[0].step_time_s, rel=1e-9)
    assert all(a.step_time_s <= b.step_time_s for a, b in zip(found.top, found.top[1:]))


def test_restrictions_are_respected() -> None:
    spec = ModelSpec.from_config(TINY)
    options = _options(fixed={"tp": 2}, schedules=(Schedule.ONE_F_ONE_B,))
    found = search(spec, _perf(4), options, world_size=4)
    assert all(g.strategy.tp == 2 for g in found.best.plan.groups())
    assert all(p.pipeline.schedule is Schedule.ONE_F_ONE_B for p in all_plans(spec, 4, 2, options))


@pytest.mark.parametrize("recompute", [(Recompute.FULL,), (Recompute.SELECTIVE, Recompute.FULL)])
def test_search_matches_brute_force_without_plain_blocks(recompute: tuple[Recompute, ...]) -> None:
    """Full recomputation allowed but no block left plain (``fixed={"recompute": "full"}`` among
    them): the search matches brute force instead of failing on the stage table it never filled."""
    spec = ModelSpec.from_config(TINY)
    options = _options(recompute=recompute, schedules=(Schedule.ONE_F_ONE_B,))
    perf, truth = _binding(spec, options)
    found = search(spec, perf, options, world_size=4)
    assert found.best.step_time_s == pytest.approx(truth[0].step_time_s, rel=1e-9)
    pinned = search(spec, _perf(4), _options(fixed={"recompute": "full"}), world_size=4).best.plan
    assert {g.strategy.recompute for g in pinned.groups()} == {Recompute.FULL}


def test_zero_bubble_takes_no_recomputation() -> None:
    """The native runtime cannot run recomputation under zero bubble (its split backward recomputes
    a checkpointed block's forward once per backward pass, one per group of weights; selective
    checkpointing refuses the second): neither the search nor brute force offers it, and with
    zero bubble next to 1F1B the search still matches brute force where memory binds."""
    spec = ModelSpec.from_config(TINY)
    options = _options(schedules=(Schedule.ZERO_BUBBLE, Schedule.ONE_F_ONE_B), fixed={"pp": 2}, top_k=8)
    perf, truth = _binding(spec, options)
    found = search(spec, perf, options, world_size=4)
    assert found.best.step_time_s == pytest.approx(truth[0].step_time_s, rel=1e-9)
    plans = [c.plan for c in found.top] + list(all_plans(spec, 4, 2, options))
    zero_bubble = [p for p in plans if p.pipeline.schedule is Schedule.ZERO_BUBBLE]
    assert zero_bubble and all(g.strategy.recompute is Recompute.NONE for p in zero_bubble for g in p.groups())
    one_f_one_b = [p for p in plans if p.pipeline.schedule is Schedule.ONE_F_ONE_B]
    assert {g.strategy.recompute for p in one_f_one_b for g in p.groups()} == set(Recompute)


def test_nothing_fits_says_how_much_memory() -> None:
    spec = ModelSpec.from_config(TINY)
    with pytest.raises(MemoryBudgetError, match="GiB per GPU"):
        search(spec, with_memory(_perf(4), 1e-6), _options(), world_size=4)


def test_nothing_fits_under_restrictions_still_says_how_much_memory() -> None:
    """With data parallelism pinned the leanest estimate takes the smallest micro-batch some dp
    divides (not one sample, which no strategy can split), and the leanest recompute mode the
    options allow: the answer is a memory figure that the allowed plans really need, not 'no plan
    applies'."""
    spec = ModelSpec.from_config(TINY)
    options = _options(recompute=(Recompute.NONE,), fixed={"dp": 4}, zero_stages=(0,))
    leanest = min(c.peak_memory_gib for c in brute_force(spec, with_memory(_perf(4), 1e9), options, world=4))
    with pytest.raises(MemoryBudgetError, match="no recomputation, the only mode allowed") as err:
        search(spec, with_memory(_perf(4), 0.99 * leanest), options, world_size=4)
    need = float(str(err.value).split(" needs ")[1].split(" GiB")[0])
    assert need == pytest.approx(leanest, rel=0.01)


@pytest.mark.parametrize("budget", ["median", "loose"])
def test_tied_embeddings_share_one_weight_layout_at_both_ends(budget: str) -> None:
    """Tied input and output embeddings across pipeline stages: every plan the search keeps gives
    the first and last stages one weight layout (dp, tp, zero, offload; the runtime adds the two
    copies' gradient shards rank by rank), and its best is brute force's best under that rule."""
    spec = ModelSpec.from_config({**TINY, "tied_embeddings": True})
    options = _options(top_k=16, fixed={"pp": 2}, zero_stages=(0, 1, 2, 3))
    if budget == "median":
        perf, truth = _binding(spec, options)
    else:
        perf = with_memory(_perf(4), 1e9)
        truth = brute_force(spec, perf, options, world=4)
    found = search(spec, perf, options, world_size=4)
    assert found.best.step_time_s == pytest.approx(truth[0].step_time_s, rel=1e-9)
    assert len(found.top) == 16
    for c in found.top:
        assert c.plan.embedding_strategy.weight_layout == c.plan.head_strategy.weight_layout, c.plan.describe()


def test_options_take_enum_values_by_name() -> None:
    """The space's enum fields accept their members' values, as YAML and the CLI spell them, and
    search them like the members; a misspelt one is a ConfigError naming the choices."""
    from galvatron.errors import ConfigError

    named = SearchOptions(schedules=("1f1b", "interleaved-1f1b"), recompute=("none", "full"), cp_kinds=("ring",),
                          dtype="bf16")
    members = SearchOptions(schedules=(Schedule.ONE_F_ONE_B, Schedule.INTERLEAVED_1F1B),
                            recompute=(Recompute.NONE, Recompute.FULL), cp_kinds=(CPKind.RING,))
    assert named == members
    spec, cluster = ModelSpec.from_config("llama2-7b"), load_cluster("8xA100-80GB")
    assert search(spec, cluster, named).best.plan == search(spec, cluster, members).best.plan
    with pytest.raises(ConfigError, match="schedules: 'interleaved' is not one of gpipe, 1f1b, interleaved-1f1b"):
        SearchOptions(schedules=("interleaved",))


def test_search_matches_brute_force_over_interleaved_splits() -> None:
    """5 blocks over 2 x 2 interleaved chunks: split unevenly with the extra block first or last, or
    over the two inner chunks with the embedding, and the norm and head, alone. The splits differ in
    time and in memory (the schedule holds the first chunk longest), and at every budget the
    search's best is brute force's best."""
    spec = ModelSpec.from_config({"name": "five", "layers": 5, "hidden": 2048, "heads": 16, "ffn_hidden": 8192,
                                  "vocab": 16384, "seq_len": 2048, "activation": "swiglu"})
    options = _options(global_batch=8, max_pp=2, cp_kinds=(), zero_stages=(0,), recompute=(Recompute.NONE,),
                       schedules=(Schedule.INTERLEAVED_1F1B,))
    every = brute_force(spec, with_memory(_perf(4), 1e9), options, world=4)
    assert {tuple(s.end - s.start for s in c.plan.stages) for c in every} == {
        (2, 1, 1, 1), (1, 1, 1, 2), (0, 3, 2, 0), (0, 2, 3, 0)}
    winners = set()
    for budget in sorted({c.peak_memory_gib for c in every}):
        truth = [c for c in every if c.peak_memory_gib <= budget]
        found = search(spec, with_memory(_perf(4), budget), options, world_size=4)
        assert found.best.step_time_s == pytest.approx(truth[0].step_time_s, rel=1e-9)
        winners.add(tuple(s.end - s.start for s in found.best.plan.stages))
    assert winners == {(2, 1, 1, 1), (1, 1, 1, 2), (0, 2, 3, 0)}  # the head weighs about a block here
    # backends that split evenly (SearchOptions.uniform): the even split alone, in both
    uniform = dataclasses.replace(options, uniform=True)
    even = brute_force(spec, with_memory(_perf(4), 1e9), uniform, world=4)
    assert {tuple(s.end - s.start for s in c.plan.stages) for c in even} == {(2, 1, 1, 1)}
    found = search(spec, with_memory(_perf(4), 1e9), uniform, world_size=4)
    assert [s.end - s.start for s in found.best.plan.stages] == [2, 1, 1, 1]
    assert found.best.step_time_s == pytest.approx(even[0].step_time_s, rel=1e-9)


def test_interleaved_splits_list_each_layout_once() -> None:
    """Even with the extra blocks first and last, the embedding and the head alone, and counted as a
    block each where blocks + 2 divide evenly (Megatron-Core's accounting); the even split alone for
    uniform backends; none where the chunks outnumber the blocks that far."""
    from galvatron.strategies.search.space import interleaved_splits

    assert interleaved_splits(6, 4) == [[2, 2, 1, 1], [1, 1, 2, 2], [0, 3, 3, 0], [1, 2, 2, 1]]
    assert interleaved_splits(8, 4) == [[2, 2, 2, 2], [0, 4, 4, 0]]  # 8 + 2 is not a multiple of 4
    assert interleaved_splits(126, 128) == [[0, *[1] * 126, 0]]  # Llama 3 405B's layout, 8 chunks per rank
    assert interleaved_splits(6, 4, uniform=True) == [[2, 2, 1, 1]]
    assert interleaved_splits(3, 8) == []
