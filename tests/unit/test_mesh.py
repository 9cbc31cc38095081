"""Rank-grid maths of the native runtime, without processes."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from galvatron.errors import PlanError
from galvatron.plan import LayerStrategy, Plan
from galvatron.runtime.mesh import (
    Layout,
    batch_groups,
    context_subgroups,
    data_layout,
    device_group_of,
    device_group_ranks,
    expert_groups,
    folded_groups,
    gradient_groups,
    pipeline_groups,
    relayout_steps,
    required_groups,
    stages_of,
)


def test_device_groups_are_consecutive_rank_ranges():
    plan = Plan.from_dict({"global_batch_size": 8, "stages": [
        {"devices": 2, "layers": [0, 2]}, {"devices": 4, "layers": [2, 4]}]})
    assert device_group_ranks(plan) == (range(0, 2), range(2, 6))
    assert [device_group_of(plan, r) for r in range(6)] == [0, 0, 1, 1, 1, 1]
    with pytest.raises(PlanError, match="rank 6 is outside"):
        device_group_of(plan, 6)


def test_virtual_stages_cycle_over_device_groups():
    plan = Plan.uniform(8, global_batch_size=8, pp=2, virtual_stages=2, schedule="interleaved-1f1b", dp=2)
    assert plan.pp == 2
    assert stages_of(plan, 0) == (0, 2) and stages_of(plan, 1) == (1, 3)
    assert pipeline_groups(plan) == ((0, 2), (1, 3))


def test_pipeline_groups_need_equal_stage_sizes():
    plan = Plan.from_dict({"global_batch_size": 8, "stages": [
        {"devices": 2, "layers": [0, 2]}, {"devices": 4, "layers": [2, 4]}]})
    with pytest.raises(PlanError, match="same device count"):
        pipeline_groups(plan)


def test_layout_coordinates_put_tp_innermost():
    lay = Layout(range(4, 12), dp=2, cp=2, tp=2)
    assert lay.coordinate(4) == (0, 0, 0)
    assert lay.coordinate(5) == (0, 0, 1)
    assert lay.coordinate(6) == (0, 1, 0)
    assert lay.coordinate(8) == (1, 0, 0)
    assert lay.group_of(9, "tp") == (8, 9)
    assert lay.group_of(9, "cp") == (9, 11)
    assert lay.group_of(9, "dp") == (5, 9)
    assert lay.data_groups() == ((4, 6, 8, 10), (5, 7, 9, 11))
    assert [lay.batch_index(r) for r in lay.ranks] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_layout_rejects_wrong_sizes():
    with pytest.raises(PlanError):
        Layout(range(4), dp=3)


@settings(deadline=None)
@given(st.sampled_from([(dp, cp, tp) for dp, cp, tp in itertools.product((1, 2, 3, 4), repeat=3)]),
       st.integers(0, 16))
def test_axis_groups_partition_the_ranks(shape, start):
    lay = Layout(range(start, start + shape[0] * shape[1] * shape[2]), *shape)
    for axis, size in zip(("dp", "cp", "tp"), shape, strict=True):
        groups = lay.axis_groups(axis)
        assert sorted(r for g in groups for r in g) == list(lay.ranks)
        assert all(len(g) == size for g in groups)
        for g in groups:  # members differ only along the axis, in axis order
            coords = [lay.coordinate(r) for r in g]
            k = ("dp", "cp", "tp").index(axis)
            assert [c[k] for c in coords] == list(range(size))
            assert len({c[:k] + c[k + 1:] for c in coords}) == 1


@settings(deadline=None)
@given(st.sampled_from([(n, fine, coarse) for n in (1, 2, 4, 6, 8, 12) for fine in range(1, n + 1)
                        for coarse in range(1, fine + 1) if n % fine == 0 and fine % coarse == 0]))
def test_gathering_a_batch_group_gives_the_coarse_shard(case):
    n, fine, coarse = case
    ranks = range(100, 100 + n)
    fine_lay = Layout(ranks, fine, 1, n // fine)
    coarse_lay = Layout(ranks, coarse, 1, n // coarse)
    groups = batch_groups(ranks, fine, coarse)
    assert sorted(r for g in groups for r in g) == list(ranks)
    for g in groups:
        # the members hold consecutive fine shards that make up one coarse shard, in order
        fine_shards = [fine_lay.batch_index(r) for r in g]
        assert {coarse_lay.batch_index(r) for r in g} == {fine_shards[0] // (fine // coarse)}
        assert fine_shards == list(range(fine_shards[0], fine_shards[0] + fine // coarse))


def test_relayout_steps_go_through_the_gcd():
    assert relayout_steps(4, 4) == ()
    assert relayout_steps(4, 2) == (("gather", 4, 2),)
    assert relayout_steps(2, 4) == (("split", 2, 4),)
    assert relayout_steps(3, 2) == (("gather", 3, 1), ("split", 1, 2))
    assert relayout_steps(6, 4) == (("gather", 6, 2), ("split", 2, 4))


def test_data_layout_follows_the_head():
    plan = Plan.from_dict({"global_batch_size": 8, "strategy": {"tp": 2},
                           "stages": [{"devices": 4, "layers": [0, 4]}], "head": {"tp": 1}})
    assert data_layout(plan, 0) == Layout(range(4), 4, 1, 1)


def test_required_groups_cover_every_layout_and_relayout():
    plan = Plan.from_dict({"global_batch_size": 8, "stages": [{"devices": 4, "layers": [
        {"range": [0, 2], "tp": 2}, {"range": [2, 4], "tp": 1}]}]})
    groups = set(required_groups(plan))
    assert {(0, 1), (2, 3), (0, 2), (1, 3), (0, 1, 2, 3)} <= groups
    assert all(len(g) == 1 for g in {(0,), (1,), (2,), (3,)} & groups)
    assert required_groups(plan) == tuple(sorted(groups, key=lambda g: (len(g), g)))


def test_required_groups_include_pipeline_groups():
    plan = Plan.uniform(4, global_batch_size=8, pp=2, dp=2)
    assert {(0, 2), (1, 3)} <= set(required_groups(plan))


def test_gradient_groups_are_the_data_groups_of_every_layout():
    plan = Plan.from_dict({"global_batch_size": 8, "stages": [{"devices": 4, "layers": [
        {"range": [0, 2], "tp": 2}, {"range": [2, 4], "tp": 4}]}]})
    # dp2 x tp2 reduces over (0, 2) and (1, 3); tp4 has no data parallelism; the data layout
    # (the head's dp) is dp1 here
    assert gradient_groups(plan) == ((0, 2), (1, 3))


def test_data_layout_carries_the_heads_token_split():
    plan = Plan.uniform(4, global_batch_size=8, cp=2, dp=2)
    lay = data_layout(plan, 0)
    assert lay == Layout(range(4), 2, 2, 1)
    assert [lay.batch_index(r) for r in range(4)] == [0, 0, 1, 1]
    assert lay.data_groups() == ((0, 1, 2, 3),)


def test_hybrid_subgroups_split_each_cp_group():
    s = LayerStrategy(dp=2, cp=4, cp_kind="hybrid", cp_ulysses=2)  # 8 ranks: cp groups 0-3 and 4-7
    assert context_subgroups(s, range(8)) == ((0, 1), (2, 3), (0, 2), (1, 3), (4, 5), (6, 7), (4, 6), (5, 7))
    assert context_subgroups(LayerStrategy(cp=4, cp_kind="ring"), range(4)) == ()
    plan = Plan.uniform(4, global_batch_size=8, cp=4, cp_kind="hybrid", cp_ulysses=2)
    assert {(0, 1), (2, 3), (0, 2), (1, 3)} <= set(required_groups(plan))


def test_expert_groups_fold_over_dp_x_cp_per_tp_index():
    s = LayerStrategy(dp=2, cp=2, tp=2, ep=2)  # data groups (0, 2, 4, 6) and (1, 3, 5, 7)
    ep_groups, edp_groups = expert_groups(s, range(8))
    assert ep_groups == ((0, 2), (4, 6), (1, 3), (5, 7))
    assert edp_groups == ((0, 4), (2, 6), (1, 5), (3, 7))
    assert expert_groups(LayerStrategy(dp=2), range(2)) == ((), ())


@pytest.mark.parametrize(("dp", "cp", "tp", "etp", "ep"), [(2, 1, 2, 1, 2), (1, 2, 2, 1, 4), (2, 1, 4, 2, 2),
                                                        (1, 1, 4, 1, 2), (4, 1, 2, 1, 1)])
def test_folded_expert_groups_follow_megatron_order(dp: int, cp: int, tp: int, etp: int, ep: int):
    """MoE Parallel Folding: over the layer's ranks in (d, c, t) order, ETP groups are etp adjacent ranks, EP
    groups ep ranks etp apart, expert-DP groups etp*ep apart (Megatron-Core); each ETP group lies in one TP
    group, and a sequence-chunk group holds the TP ranks of one ETP index in TP order."""
    start, n = 4, dp * cp * tp
    ranks = range(start, start + n)
    s = LayerStrategy(dp=dp, cp=cp, tp=tp, sp=True, ep=ep, etp=etp)
    ep_groups, edp_groups = expert_groups(s, ranks)
    etp_groups, chunk_groups = folded_groups(s, ranks)

    def members(same: object) -> set[tuple[int, ...]]:
        return {tuple(r for r in ranks if same(r - start) == same(i)) for i in range(n)}

    assert set(etp_groups) == members(lambda i: i // etp)
    assert set(ep_groups) == members(lambda i: (i // (etp * ep), i % etp))
    assert set(edp_groups) == members(lambda i: i % (etp * ep))
    assert set(chunk_groups) == members(lambda i: (i // tp, i % etp))
    for groups in (etp_groups, ep_groups, edp_groups, chunk_groups):
        assert all(list(g) == sorted(g) for g in groups)
    plan = Plan.from_dict({"global_batch_size": 8, "stages": [{"devices": n, "layers": [
        {"range": [0, 1], "dp": dp, "cp": cp, "tp": tp, "sp": True, "ep": ep, "etp": etp}]}]})
    shifted = [tuple(r - start for r in g) for g in (*ep_groups, *etp_groups, *chunk_groups)]
    assert set(shifted) <= set(required_groups(plan))
    assert {tuple(r - start for r in g) for g in edp_groups if len(g) > 1} <= set(gradient_groups(plan))
    assert folded_groups(LayerStrategy(dp=2, tp=2, ep=2), range(4)) == ((), ())


def test_expert_tp_must_divide_tp():
    with pytest.raises(PlanError, match=r"^etp: 2 does not divide tp 1"):
        expert_groups(LayerStrategy(dp=4, ep=2, etp=2), range(4))


def test_expert_data_parallel_groups_are_gradient_groups():
    plan = Plan.from_dict({"global_batch_size": 8, "stages": [{"devices": 4, "layers": [
        {"range": [0, 1], "ep": 2}, {"range": [1, 2]}]}]})
    assert set(gradient_groups(plan)) == {(0, 1, 2, 3), (0, 2), (1, 3)}
    assert {(0, 1), (2, 3)} <= set(required_groups(plan))
