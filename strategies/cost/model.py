"""``cost_plan``: step time, throughput and per-GPU memory of a plan for a model on a cluster."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from galvatron.strategies.cost.layer import (
    LayerContext,
    LayerCost,
    layer_cost,
    tied_copy,
    tied_gradient_sum,
    tokens_per_rank,
)
from galvatron.strategies.cost.options import CostOptions
from galvatron.strategies.cost.perf import DatasheetPerf, Perf
from galvatron.strategies.cost.step import (
    ACT,
    FB,
    POST,
    VECTOR_LEN,
    GroupTotals,
    chunk_in_flight,
    combine,
    grads_persist,
    hidden_behind,
    peak_activations,
    step_time,
)
from galvatron.strategies.hardware import Cluster

from galvatron.plan import DType, LayerStrategy, Plan, Schedule
from galvatron.spec import LayerKind, LayerSpec, ModelSpec

GIB = 2**30
COMM_KINDS = ("tp", "cp", "ep", "zero", "pp", "dp")


@dataclass(frozen=True)
class StageReport:
    """One device group (pipeline stage) of the step: seconds per step and GiB per GPU."""

    index: int
    layers: tuple[tuple[int, int], ...]
    devices: int
    compute_s: float
    comm_s: dict[str, float]
    bubble_s: float
    memory_gib: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.index, "layers": [list(r) for r in self.layers], "devices": self.devices,
                "compute_s": self.compute_s, "comm_s": dict(self.comm_s), "bubble_s": self.bubble_s,
                "memory_gib": dict(self.memory_gib)}


@dataclass(frozen=True)
class PlanCost:
    """What a plan costs. ``peak_memory_gib`` is the most loaded GPU's; ``fits`` compares it with
    ``memory_limit_gib`` (device memory minus the runtime's reserve)."""

    plan: Plan
    step_time_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: float
    peak_memory_gib: float
    memory_limit_gib: float
    stages: tuple[StageReport, ...] = field(default=())

    @property
    def fits(self) -> bool:
        return self.peak_memory_gib <= self.memory_limit_gib

    def to_dict(self) -> dict[str, Any]:
        return {
            "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
            "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu, "peak_memory_gib": self.peak_memory_gib,
            "memory_limit_gib": self.memory_limit_gib, "fits": self.fits, "plan": self.plan.to_dict(),
            "stages": [s.to_dict() for s in self.stages],
        }


def as_perf(cluster: Cluster | Perf) -> Perf:
    """A :class:`Perf` for a cluster from the database, or the given (e.g. measured) one."""
    return DatasheetPerf(cluster) if isinstance(cluster, Cluster) else cluster


def cost_plan(plan: Plan, spec: ModelSpec, cluster: Cluster | Perf, options: CostOptions | None = None) -> PlanCost:
    """Cost ``plan`` for ``spec`` on ``cluster`` (or a measured :class:`Perf`). The plan is validated
    against the model (and the cluster's size when a :class:`Cluster` is given) first."""
    options = options or CostOptions()
    plan.validate(cluster.world_size if isinstance(cluster, Cluster) else None, spec)
    perf = as_perf(cluster)
    pp, v, m = plan.pp, plan.pipeline.virtual_stages, plan.num_micro_batches
    acc = [_GroupAcc() for _ in range(pp)]
    for j, stage in enumerate(plan.stages):
        ctx = LayerContext(perf=perf, options=options, dtype=plan.dtype, seq_len=spec.seq_len, causal=spec.causal,
                           micro_batch=plan.micro_batch_size, stage_devices=stage.devices, micro_batches=m)
        group = acc[j % pp]
        group.ranges.append((stage.start, stage.end))
        held, busy = group.sums[ACT], group.sums[FB]
        for layer, strategy in _stage_layers(plan, spec, j):
            group.add(layer_cost(ctx, layer, strategy))
        if pp > 1 and j in (0, len(plan.stages) - 1):
            edge = plan.embedding_strategy if j == 0 else plan.head_strategy
            group.add(tied_copy(ctx, spec, edge, holder=j > 0))
        elif pp == 1:
            group.add(tied_gradient_sum(ctx, spec, plan.embedding_strategy))
        group.chunk_act.append(group.sums[ACT] - held)
        if pp > 1:
            group.p2p += schedule_overhead(options)
        if j + 1 < len(plan.stages):
            handoff = p2p_time(ctx, spec.hidden, plan.stages[j].groups[-1].strategy)
            if options.overlap_p2p and v > 1:  # beside the chunk's own forward and backward
                handoff = hidden_behind(handoff, group.sums[FB] - busy, options)
            group.p2p += handoff
        if j > 0 and options.blocking_p2p:  # the receiving side's handoffs, at its own input's size
            group.p2p += p2p_time(ctx, spec.hidden, plan.stages[j].groups[0].strategy)
    zb = plan.pipeline.schedule is Schedule.ZERO_BUBBLE
    persist = grads_persist(options, m)
    totals = [a.totals(chunk_in_flight(plan.pipeline.schedule, pp, v, m, g), zb, options, persist)
              for g, a in enumerate(acc)]
    step = step_time(totals, m, v)
    return _report(plan, spec, perf, acc, totals, step)


def schedule_overhead(options: CostOptions) -> float:
    """Per micro-batch, the pipeline schedule's host time for one chunk: its forward and its backward
    action (``CostOptions.pipeline_action_s`` each)."""
    return 2 * options.pipeline_action_s


def p2p_time(ctx: LayerContext, hidden: int, sender: LayerStrategy) -> float:
    """Activation send forward plus gradient receive backward at a stage's output, per micro-batch,
    charged to the earlier stage: each TP rank moves its 1/tp share (Megatron's scatter/gather
    optimisation, Narayanan et al. SC'21 §4.1; sequence-parallel layouts are sharded already), in
    the plan's activation dtype."""
    nbytes = tokens_per_rank(ctx, sender) * hidden * (4 if ctx.dtype is DType.FP32 else 2) / sender.tp
    inter = ctx.stage_devices >= ctx.perf.gpus_per_node
    return 2 * ctx.perf.p2p_time(nbytes, inter)


def _stage_layers(plan: Plan, spec: ModelSpec, j: int) -> Iterator[tuple[LayerSpec, LayerStrategy]]:
    """The layers stage ``j`` runs, in order, with their strategies (embedding first, norm and head last)."""
    stage = plan.stages[j]
    if j == 0:
        for layer in spec.layers_of(LayerKind.EMBEDDING):
            yield layer, plan.embedding_strategy
    for g in stage.groups:
        for index in range(g.start, g.end):
            yield spec.blocks[index], g.strategy
    if j == len(plan.stages) - 1:
        for kind in (LayerKind.NORM, LayerKind.HEAD):
            for layer in spec.layers_of(kind):
                yield layer, plan.head_strategy


class _GroupAcc:
    """Running sums of one device group's layer costs."""

    def __init__(self) -> None:
        self.sums = [0.0] * VECTOR_LEN
        self.work = 0.0
        self.p2p = 0.0
        self.comm = dict.fromkeys(COMM_KINDS, 0.0)
        self.flops = 0.0
        self.parts = {"params": 0.0, "grads": 0.0, "optimizer": 0.0}
        self.ranges: list[tuple[int, int]] = []
        self.chunk_act: list[float] = []
        """Activation bytes per micro-batch of each of the group's chunks, in order."""

    def add(self, c: LayerCost) -> None:
        for i, x in enumerate(c.vector()):
            self.sums[i] += x
        self.work = max(self.work, c.work)
        self.flops += c.flops
        for kind, t in c.comm.items():
            self.comm[kind] += t
        self.parts["params"] += c.params
        self.parts["grads"] += c.grads
        self.parts["optimizer"] += c.optim_states

    def totals(self, rows: np.ndarray, zb: bool, options: CostOptions, persist: bool) -> GroupTotals:
        """``rows``: the group's :func:`chunk_in_flight`."""
        return combine(self.sums, self.work, self.p2p, 0.0, zb, options, persist,
                       act=peak_activations(rows, self.chunk_act))


def _report(plan: Plan, spec: ModelSpec, perf: Perf, acc: list[_GroupAcc], totals: list[GroupTotals],
            step: float) -> PlanCost:
    m = plan.num_micro_batches
    tokens = plan.global_batch_size * spec.seq_len
    world = plan.world_size
    model_flops = spec.flops_per_token(training=True) * tokens
    tflops = model_flops / step / world / 1e12
    stages = []
    for g, (a, tot) in enumerate(zip(acc, totals)):
        comm = {k: m * a.comm[k] for k in COMM_KINDS}
        comm["pp"] = m * a.p2p
        comm["dp"] = tot.exposed_sync + a.sums[POST]
        busy = m * tot.t + tot.e
        memory = {k: v / GIB for k, v in a.parts.items()}
        memory["activations"] = tot.activations / GIB
        memory["buffers"] = a.work / GIB
        memory["total"] = tot.memory / GIB
        stages.append(StageReport(index=g, layers=tuple(a.ranges), devices=plan.stages[g].devices,
                                  compute_s=m * tot.t - sum(comm[k] for k in ("tp", "cp", "ep", "zero", "pp")),
                                  comm_s=comm, bubble_s=step - busy, memory_gib=memory))
    return PlanCost(plan=plan, step_time_s=step, tokens_per_s=tokens / step, tflops_per_gpu=tflops,
                    mfu=tflops * 1e12 / perf.peak_flops(plan.dtype.value),
                    peak_memory_gib=max(t.memory for t in totals) / GIB,
                    memory_limit_gib=perf.memory_bytes / GIB, stages=tuple(stages))
