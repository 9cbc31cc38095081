"""The cluster profiler on 2 gloo ranks: every collective measured on every rank alike, a valid
profile that round-trips through YAML, and measured numbers reaching the cost model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from galvatron.profiler.calibrate import profiled_perf
from galvatron.profiler.cluster import ClusterOptions, profile_cluster
from galvatron.profiler.schema import COLLECTIVES, ClusterProfile
from galvatron.strategies.cost import Group, cost_plan
from galvatron.strategies.hardware import load_cluster

from galvatron.models import GPTConfig
from galvatron.plan import Plan
from galvatron.spec import ModelSpec
from galvatron.testing import run_ranks


def _profile() -> ClusterProfile:
    return profile_cluster(ClusterOptions(min_bytes=1 << 10, max_bytes=1 << 16, iters=2, warmup=1), progress=False)


@pytest.fixture(scope="module")
def profiles() -> list[ClusterProfile]:
    return run_ranks(_profile, 2, timeout=120)


def test_two_gloo_ranks(profiles: list[ClusterProfile], tmp_path: Path) -> None:
    first, second = profiles
    assert first.backend == "gloo" and first.world_size == 2 and first.nodes == 1 and first.ranks_per_node == 2
    assert sorted(c.op for c in first.collectives) == sorted(COLLECTIVES)
    assert first.collectives == second.collectives  # the slowest rank's times, shared
    for c in first.collectives:
        assert c.group_size == 2 and c.placement == "intra"
        assert [p.bytes for p in c.points] == [1 << 10, 1 << 12, 1 << 14, 1 << 16]
        assert all(p.time_s > 0 for p in c.points) and c.busbw_gbps > 0
    # on CPU the overlap test runs gloo beside matmuls on this thread: a slowdown and lost compute
    assert first.overlap is not None and first.overlap.group_size == 2 and first.overlap.interference >= 0
    assert first.overlap.compute_slowdown > 0 and first.overlap.comm_slowdown > 0
    # a 2-stage pipeline with 1 and 4 chunks per rank: host time per action, the same on both ranks (0
    # where noise on shared cores drowns it: pipeline_action_seconds, unit-tested)
    assert first.pipeline_action_s is not None and 0 <= first.pipeline_action_s < 0.05
    assert second.pipeline_action_s == first.pipeline_action_s
    # CPU workers: compute shared among the ranks over alone, the same number on both ranks
    assert first.compute_sharing is not None and 0.5 < first.compute_sharing < 4
    assert second.compute_sharing == first.compute_sharing
    assert ClusterProfile.load(first.save(tmp_path / "cluster.yaml")) == first


def test_cost_model_uses_the_measured_network(profiles: list[ClusterProfile]) -> None:
    measured = profiles[0]
    datasheet = profiled_perf(load_cluster("8xH100"))
    perf = profiled_perf(load_cluster("8xH100"), cluster_profile=measured)
    curve = measured.find("all_reduce", 2)
    assert curve is not None
    group = Group(size=2, per_node=8)
    assert perf.collective_time("all_reduce", 1 << 14, group) == pytest.approx(curve.time(1 << 14))
    # gloo over loopback is far slower than NVLink: the measured curve, not the datasheet, answers
    assert perf.collective_time("all_reduce", 1 << 16, group) > datasheet.collective_time("all_reduce", 1 << 16, group)
    spec = ModelSpec.from_config(GPTConfig().to_model_config())
    plan = Plan.uniform(spec.num_blocks, global_batch_size=2, dp=2)
    with_profile, without = cost_plan(plan, spec, perf), cost_plan(plan, spec, datasheet)
    assert math.isfinite(with_profile.step_time_s)
    assert with_profile.stages[0].comm_s["dp"] > without.stages[0].comm_s["dp"]
