"""A pipeline timeline: when each device group runs each micro-batch's forward and backward.

The cost model predicts a step in closed form (per-micro-batch time per device group, bubble,
once-per-step tail). To draw it, this module replays the plan's schedule op by op: every device
group runs its passes in the schedule's fixed order, each as soon as its input has arrived (list
scheduling). Per-pass times come from the cost model's per-stage totals, split into forward and
backward by FLOPs (backward = 2x forward, +1x with full recomputation; zero-bubble splits backward
into input and weight gradients of one forward each, Qi et al. 2023 §2).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from galvatron.plan import Plan, Recompute, Schedule, warmup_forwards
from galvatron.report.data import CostSummary


class OpKind(enum.StrEnum):
    """What a timeline op is."""

    FORWARD = "F"
    BACKWARD = "B"
    """Backward pass; input gradients only under zero-bubble, input and weight gradients otherwise."""
    WEIGHT = "W"
    """Weight gradients, run apart from ``B`` by zero-bubble schedules."""
    SYNC = "sync"
    """Exposed data-parallel gradient synchronisation after the last backward."""
    OPTIMIZER = "optimizer"


PASSES = (OpKind.FORWARD, OpKind.BACKWARD, OpKind.WEIGHT)


@dataclass(frozen=True, kw_only=True)
class PassTimes:
    """Seconds one micro-batch spends in one stage (a model chunk of a device group)."""

    forward_s: float
    input_grad_s: float
    weight_grad_s: float
    comm_share: float = 0.0
    """Fraction of each pass that is communication (TP/CP/EP/ZeRO collectives, pipeline p2p)."""


@dataclass(frozen=True, kw_only=True)
class Op:
    """One box of the timeline."""

    kind: OpKind
    group: int
    stage: int
    """Index into ``Plan.stages`` (model order); -1 for the once-per-step tail."""
    micro_batch: int
    """-1 for the once-per-step tail."""
    start: float
    end: float
    comm_s: float = 0.0

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, kw_only=True)
class Timeline:
    """All ops of one training step, per device group."""

    schedule: Schedule
    pp: int
    virtual_stages: int
    num_micro_batches: int
    ops: tuple[Op, ...]

    @property
    def makespan(self) -> float:
        return max(op.end for op in self.ops)

    def group_ops(self, group: int) -> list[Op]:
        return [op for op in self.ops if op.group == group]

    def busy_s(self, group: int) -> float:
        return sum(op.duration for op in self.group_ops(group))

    def bubble_s(self, group: int) -> float:
        """Idle seconds of a device group within the step."""
        return self.makespan - self.busy_s(group)


def pass_order(schedule: Schedule, pp: int, v: int, m: int, group: int) -> list[tuple[OpKind, int, int]]:
    """The passes ``(kind, chunk, micro_batch)`` device group ``group`` runs, in order.

    GPipe: all forwards, then all backwards (Huang et al. 2019). 1F1B: ``pp - group - 1`` warm-up
    forwards, then one forward one backward (Narayanan et al. SC'21 §2.2.1); interleaved with ``v``
    chunks: forwards in rounds of ``pp`` micro-batches per chunk, ``2(pp - group - 1) + (v - 1) pp``
    warm-up passes (Megatron-LM ``schedules.py``). Zero-bubble (ZB-H1, Qi et al. 2023): the 1F1B
    order with each weight-gradient pass of group ``g`` deferred by ``g`` backwards, so input
    gradients travel up the pipeline without waiting and the deferred passes fill the drain.
    """
    forwards = _chunk_order(pp, v, m, reverse=False)
    backwards = _chunk_order(pp, v, m, reverse=True)
    if schedule is Schedule.GPIPE:
        return [(OpKind.FORWARD, c, i) for c, i in forwards] + [(OpKind.BACKWARD, c, i) for c, i in backwards]
    warmup = warmup_forwards(pp, v, m, group)
    order = [(OpKind.FORWARD, c, i) for c, i in forwards[:warmup]]
    for k, (c, i) in enumerate(forwards[warmup:]):
        order += [(OpKind.FORWARD, c, i), (OpKind.BACKWARD, *backwards[k])]
    order += [(OpKind.BACKWARD, c, i) for c, i in backwards[len(forwards) - warmup:]]
    if schedule is Schedule.ZERO_BUBBLE:
        return _defer_weight_grads(order, group)
    return order


def _chunk_order(pp: int, v: int, m: int, reverse: bool) -> list[tuple[int, int]]:
    """``(chunk, micro_batch)`` in Megatron's interleaved order: rounds of ``pp`` micro-batches, each
    round through every chunk (last chunk first for backwards)."""
    chunks = range(v - 1, -1, -1) if reverse else range(v)
    out = []
    for first in range(0, m, pp):
        batch = range(first, min(first + pp, m))
        out += [(c, i) for c in chunks for i in batch]
    return out


def _defer_weight_grads(order: list[tuple[OpKind, int, int]], delay: int) -> list[tuple[OpKind, int, int]]:
    out: list[tuple[OpKind, int, int]] = []
    pending: deque[tuple[OpKind, int, int]] = deque()
    for kind, c, i in order:
        out.append((kind, c, i))
        if kind is OpKind.BACKWARD:
            pending.append((OpKind.WEIGHT, c, i))
            if len(pending) > delay:
                out.append(pending.popleft())
    return out + list(pending)


def simulate(schedule: Schedule, pp: int, v: int, m: int, passes: Sequence[PassTimes],
             tails: Sequence[tuple[float, float]] = ()) -> Timeline:
    """Replay a schedule. ``passes[j]`` times stage ``j = chunk * pp + group``; ``tails[g]`` is the
    (gradient sync, optimizer) seconds device group ``g`` spends after its last pass."""
    if len(passes) != pp * v:
        raise ValueError(f"{len(passes)} stage times for pp={pp} x v={v} stages")
    orders = [deque(pass_order(schedule, pp, v, m, g)) for g in range(pp)]
    split = schedule is Schedule.ZERO_BUBBLE
    done: dict[tuple[OpKind, int, int], float] = {}
    free = [0.0] * pp
    ops: list[Op] = []
    while any(orders):
        progressed = False
        for g, order in enumerate(orders):
            while order:
                kind, chunk, i = order[0]
                stage = chunk * pp + g
                deps = [done.get(d) for d in _dependencies(kind, stage, i, pp * v)]
                if None in deps:
                    break
                order.popleft()
                t = passes[stage]
                length = _duration(kind, t, split)
                start = max([free[g], *deps])
                free[g] = done[(kind, stage, i)] = start + length
                ops.append(Op(kind=kind, group=g, stage=stage, micro_batch=i, start=start, end=free[g],
                              comm_s=length * t.comm_share))
                progressed = True
        if not progressed:
            raise RuntimeError(f"{schedule.value} order deadlocks at pp={pp} v={v} m={m}: a bug in pass_order")
    for g, (sync, optimizer) in enumerate(tails):
        ops.append(Op(kind=OpKind.SYNC, group=g, stage=-1, micro_batch=-1, start=free[g], end=free[g] + sync,
                      comm_s=sync))
        ops.append(Op(kind=OpKind.OPTIMIZER, group=g, stage=-1, micro_batch=-1, start=free[g] + sync,
                      end=free[g] + sync + optimizer))
    return Timeline(schedule=schedule, pp=pp, virtual_stages=v, num_micro_batches=m, ops=tuple(ops))


def _dependencies(kind: OpKind, stage: int, i: int, stages: int) -> list[tuple[OpKind, int, int]]:
    if kind is OpKind.FORWARD:
        return [(OpKind.FORWARD, stage - 1, i)] if stage else []
    if kind is OpKind.WEIGHT:
        return [(OpKind.BACKWARD, stage, i)]
    return [(OpKind.BACKWARD, stage + 1, i) if stage + 1 < stages else (OpKind.FORWARD, stage, i)]


def _duration(kind: OpKind, t: PassTimes, split: bool) -> float:
    if kind is OpKind.FORWARD:
        return t.forward_s
    if kind is OpKind.WEIGHT:
        return t.weight_grad_s
    return t.input_grad_s if split else t.input_grad_s + t.weight_grad_s


def timeline_from_cost(cost: CostSummary) -> Timeline:
    """The timeline of a costed plan: each device group's predicted per-micro-batch time split over
    its stages by block count (a stage without blocks gets none of it) and into passes by FLOPs; its
    tail is exposed DP sync, then optimizer."""
    plan = cost.plan
    pp, v, m = plan.pp, plan.pipeline.virtual_stages, plan.num_micro_batches
    passes, tails = [], []
    for j in range(len(plan.stages)):
        group = cost.stages[j % pp]
        busy = group.compute_s + group.micro_batch_comm_s
        share = _layers(plan, j) / sum(_layers(plan, k) for k in range(j % pp, len(plan.stages), pp))
        passes.append(_split_passes(plan, j, busy / m * share, group.micro_batch_comm_s / busy if busy else 0.0))
    for group in cost.stages:
        tail = max(cost.step_time_s - group.bubble_s - group.compute_s - group.micro_batch_comm_s, 0.0)
        sync = min(group.comm_s.get("dp", 0.0), tail)
        tails.append((sync, tail - sync))
    return simulate(plan.pipeline.schedule, pp, v, m, passes, tails)


def _layers(plan: Plan, j: int) -> int:
    return plan.stages[j].end - plan.stages[j].start


def _split_passes(plan: Plan, j: int, seconds: float, comm_share: float) -> PassTimes:
    """Forward : input gradients : weight gradients = 1 : 1 (+1 recomputed forward) : 1 per block."""
    units = [0.0, 0.0, 0.0]
    for g in plan.stages[j].groups:
        recompute = 1.0 if g.strategy.recompute is Recompute.FULL else 0.0
        for k, u in enumerate((1.0, 1.0 + recompute, 1.0)):
            units[k] += u * g.num_layers
    total = sum(units)  # 0 for a stage without blocks (the embedding, or the norm and head, alone)
    scale = seconds / total if total else 0.0
    return PassTimes(forward_s=units[0] * scale, input_grad_s=units[1] * scale, weight_grad_s=units[2] * scale,
                     comm_share=comm_share)
