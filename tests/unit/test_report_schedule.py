"""The pipeline timeline replay: pass orders, dependencies, closed-form step times, in-flight memory."""

from __future__ import annotations

import itertools

import pytest

from galvatron.plan import Schedule
from galvatron.report.schedule import OpKind, PassTimes, Timeline, pass_order, simulate

SHAPES = [(1, 1, 1), (1, 1, 4), (2, 1, 3), (2, 1, 8), (4, 1, 4), (4, 1, 16), (8, 1, 16), (2, 2, 4), (4, 2, 8),
          (4, 4, 16), (8, 2, 8)]
"""(pp, v, m); virtual stages need m to be a multiple of pp (Plan.validate)."""


def _cases() -> list[tuple[Schedule, int, int, int]]:
    out = []
    for schedule, (pp, v, m) in itertools.product(Schedule, SHAPES):
        if v > 1 and schedule in (Schedule.GPIPE, Schedule.ONE_F_ONE_B):
            continue
        out.append((schedule, pp, v, m))
    return out


def _uniform(schedule: Schedule, pp: int, v: int, m: int, f: float = 1.0, b: float = 1.0, w: float = 1.0) -> Timeline:
    passes = [PassTimes(forward_s=f / v, input_grad_s=b / v, weight_grad_s=w / v)] * (pp * v)
    return simulate(schedule, pp, v, m, passes)


@pytest.mark.parametrize(("schedule", "pp", "v", "m"), _cases())
def test_every_pass_once_per_group(schedule: Schedule, pp: int, v: int, m: int) -> None:
    kinds = (OpKind.FORWARD, OpKind.BACKWARD) + ((OpKind.WEIGHT,) if schedule is Schedule.ZERO_BUBBLE else ())
    for g in range(pp):
        order = pass_order(schedule, pp, v, m, g)
        assert sorted(order) == sorted(itertools.product(kinds, range(v), range(m)))


@pytest.mark.parametrize(("schedule", "pp", "v", "m"), _cases())
def test_replay_respects_dependencies_and_devices(schedule: Schedule, pp: int, v: int, m: int) -> None:
    timeline = _uniform(schedule, pp, v, m, f=1.0, b=1.3, w=0.7)
    end = {(op.kind, op.stage, op.micro_batch): op for op in timeline.ops}
    for op in timeline.ops:
        if op.kind is OpKind.FORWARD and op.stage > 0:
            assert op.start >= end[(OpKind.FORWARD, op.stage - 1, op.micro_batch)].end - 1e-12
        if op.kind is OpKind.BACKWARD:
            before = (OpKind.BACKWARD, op.stage + 1, op.micro_batch) if op.stage + 1 < pp * v else \
                (OpKind.FORWARD, op.stage, op.micro_batch)
            assert op.start >= end[before].end - 1e-12
        if op.kind is OpKind.WEIGHT:
            assert op.start >= end[(OpKind.BACKWARD, op.stage, op.micro_batch)].end - 1e-12
    for g in range(pp):
        ops = sorted(timeline.group_ops(g), key=lambda op: op.start)
        assert all(a.end <= b.start + 1e-12 for a, b in itertools.pairwise(ops))
        assert {op.stage % pp for op in ops} == {g}


@pytest.mark.parametrize(("schedule", "pp", "v", "m"), _cases())
def test_step_time_matches_closed_form(schedule: Schedule, pp: int, v: int, m: int) -> None:
    """Equal stages: (m + (pp-1)/v)(F+B) for GPipe, 1F1B and interleaved 1F1B (Narayanan et al. SC'21);
    m(F+B+W) + (pp-1)(F+B-W)/v for ZB-H1 (Qi et al. 2023)."""
    f, b, w = 1.0, 1.5, 0.8
    bubble = (pp - 1) * ((f + b - w) if schedule is Schedule.ZERO_BUBBLE else (f + b + w)) / v
    timeline = _uniform(schedule, pp, v, m, f, b, w)
    assert timeline.makespan == pytest.approx(m * (f + b + w) + bubble)
    assert [timeline.bubble_s(g) for g in range(pp)] == pytest.approx([bubble] * pp)


@pytest.mark.parametrize(("pp", "m"), [(2, 8), (4, 8), (4, 3), (8, 16)])
def test_activations_in_flight(pp: int, m: int) -> None:
    """GPipe holds all m micro-batches on every group; 1F1B holds at most pp - group (Narayanan §2.2.1)."""
    for schedule, limit in ((Schedule.GPIPE, lambda g: m), (Schedule.ONE_F_ONE_B, lambda g: min(pp - g, m))):
        timeline = _uniform(schedule, pp, 1, m)
        for g in range(pp):
            live = peak = 0
            for op in sorted(timeline.group_ops(g), key=lambda op: op.start):
                live += 1 if op.kind is OpKind.FORWARD else -1
                peak = max(peak, live)
            assert peak == limit(g)


@pytest.mark.parametrize(("schedule", "pp", "v", "m"), _cases())
def test_chunk_in_flight_is_the_replayed_peak(schedule: Schedule, pp: int, v: int, m: int) -> None:
    """The cost model's per-chunk in-flight rows give, for any activation size per chunk, the peak
    of the replayed timeline: each chunk's micro-batch held from its forward's start to its
    backward's end, walked in time order."""
    import numpy as np
    from galvatron.strategies.cost.step import chunk_in_flight, peak_activations

    timeline = _uniform(schedule, pp, v, m)
    gen = np.random.default_rng(pp * 100 + v * 10 + m)
    for g in range(pp):
        for sizes in ([1.0] * v, list(gen.uniform(0.1, 3.0, v)), [5.0] + [0.2] * (v - 1), [0.2] * (v - 1) + [5.0]):
            live, peak = [0] * v, 0.0
            for op in sorted(timeline.group_ops(g), key=lambda op: op.start):
                if op.kind in (OpKind.FORWARD, OpKind.BACKWARD):
                    live[op.stage // pp] += 1 if op.kind is OpKind.FORWARD else -1
                    peak = max(peak, sum(n * x for n, x in zip(live, sizes, strict=True)))
            rows = chunk_in_flight(schedule, pp, v, m, g)
            assert peak_activations(rows, sizes) == pytest.approx(peak)


@pytest.mark.parametrize(("pp", "v", "m"), [(2, 2, 4), (4, 2, 8), (4, 4, 16), (8, 2, 8), (4, 3, 12), (16, 7, 32)])
def test_interleaved_order_is_the_runtimes(pp: int, v: int, m: int) -> None:
    """The order the cost model and the timeline assume for interleaved 1F1B is the one the native
    runtime runs: torch.distributed.pipelining's ScheduleInterleaved1F1B, rank by rank (its private
    per-rank planner, read without building stages; skipped where a torch version lacks it)."""
    from torch.distributed.pipelining import schedules

    planner = getattr(schedules.ScheduleInterleaved1F1B, "_calculate_single_rank_operations", None)
    if planner is None:
        pytest.skip("this torch has no ScheduleInterleaved1F1B._calculate_single_rank_operations")
    runtime = object.__new__(schedules.ScheduleInterleaved1F1B)
    runtime.pp_group_size, runtime.n_local_stages, runtime._n_microbatches = pp, v, m
    runtime.number_of_rounds = max(1, m // pp)
    runtime.microbatches_per_round = m // runtime.number_of_rounds
    for rank in range(pp):
        runtime.rank = rank
        ops = [(OpKind.FORWARD if a.computation_type == schedules._ComputationType.FORWARD else OpKind.BACKWARD,
                a.stage_index // pp, a.microbatch_index) for a in planner(runtime, rank) if a is not None]
        assert ops == pass_order(Schedule.INTERLEAVED_1F1B, pp, v, m, rank)


def test_zero_bubble_beats_1f1b_and_tail_follows_last_pass() -> None:
    passes = [PassTimes(forward_s=1.0, input_grad_s=1.0, weight_grad_s=1.0, comm_share=0.25)] * 4
    zb = simulate(Schedule.ZERO_BUBBLE, 4, 1, 8, passes, tails=[(0.5, 0.2)] * 4)
    one = simulate(Schedule.ONE_F_ONE_B, 4, 1, 8, passes, tails=[(0.5, 0.2)] * 4)
    assert zb.makespan < one.makespan
    for g in range(4):
        ops = zb.group_ops(g)
        sync = next(op for op in ops if op.kind is OpKind.SYNC)
        optimizer = next(op for op in ops if op.kind is OpKind.OPTIMIZER)
        last = max(op.end for op in ops if op.kind in (OpKind.FORWARD, OpKind.BACKWARD, OpKind.WEIGHT))
        assert sync.start == last and sync.duration == pytest.approx(0.5) and optimizer.start == sync.end
        assert next(op for op in ops if op.kind is OpKind.FORWARD).comm_s == pytest.approx(0.25)


def test_wrong_number_of_stage_times() -> None:
    with pytest.raises(ValueError, match="3 stage times for pp=2 x v=2"):
        simulate(Schedule.INTERLEAVED_1F1B, 2, 2, 4, [PassTimes(forward_s=1, input_grad_s=1, weight_grad_s=1)] * 3)
