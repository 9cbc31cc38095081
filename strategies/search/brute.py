"""Brute force over the search space: every plan :func:`search` claims to cover, each costed with
:func:`strategies.cost.cost_plan`. Only for instances small enough to enumerate (tests)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

from galvatron.strategies.cost.model import PlanCost, as_perf, cost_plan
from galvatron.strategies.cost.options import CostOptions
from galvatron.strategies.cost.perf import Perf
from galvatron.strategies.hardware import Cluster
from galvatron.strategies.search.search import _groups
from galvatron.strategies.search.space import (
    SearchOptions,
    default_global_batch,
    interleaved_splits,
    micro_batch_counts,
    pp_candidates,
    recompute_modes,
    strategies,
)
from galvatron.strategies.search.stages import StageChoice

from galvatron.plan import Pipeline, Plan, Recompute, Schedule, Stage, even_split
from galvatron.spec import ModelSpec


def all_plans(spec: ModelSpec, world: int, gpus_per_node: int, options: SearchOptions) -> Iterator[Plan]:
    """Every plan of the space, in no particular order."""
    global_batch = options.global_batch or default_global_batch(spec, world)
    for pp in pp_candidates(spec, world, options):
        devices = world // pp
        cands = strategies(spec, devices, gpus_per_node, options)
        for m in micro_batch_counts(global_batch, pp, options):
            usable = [s for s in cands if (global_batch // m) % s.dp == 0]
            for schedule in options.schedules:
                if not options.can(f"schedule:{schedule.value}"):
                    continue
                lower, allow_full = recompute_modes(options, schedule)
                yield from _plans(spec, pp, m, schedule, usable, lower, allow_full, global_batch, devices, options)


def _plans(spec: ModelSpec, pp: int, m: int, schedule: Schedule, usable: list, lower: list, allow_full: bool,
           global_batch: int, devices: int, options: SearchOptions) -> Iterator[Plan]:
    L = spec.num_blocks

    def make(stages: list[tuple[int, int, StageChoice]], v: int) -> Plan:
        built = tuple(Stage(devices=devices, groups=_groups(spec, a, b, c)) for a, b, c in stages)
        return Plan(stages=built, global_batch_size=global_batch, num_micro_batches=m,
                    pipeline=Pipeline(schedule=schedule, virtual_stages=v), dtype=options.dtype)

    if schedule is Schedule.INTERLEAVED_1F1B:
        if pp == 1 or m % pp:
            return
        for v in range(2, options.max_vpp + 1):
            for split in interleaved_splits(L, pp * v, options.uniform):
                yield from (make(st, v) for st in _uniform_stages(split, usable, lower, allow_full))
        return
    if schedule is Schedule.ZERO_BUBBLE and (pp == 1 or m % pp):
        return
    if options.uniform:
        yield from (make(st, 1) for st in _uniform_stages(even_split(L, pp), usable, lower, allow_full))
        return
    for split in _compositions(L, pp):
        bounds = [sum(split[:i]) for i in range(pp + 1)]
        per_stage = [list(_stage_choices(usable, lower, allow_full, bounds[i + 1] - bounds[i])) for i in range(pp)]
        for picks in itertools.product(*per_stage):
            if spec.tied_embeddings and picks[0].strategy.weight_layout != picks[-1].strategy.weight_layout:
                continue  # tied embeddings: both ends in one weight layout (the runtime needs it)
            yield make([(bounds[i], bounds[i + 1], picks[i]) for i in range(pp)], 1)


def _uniform_stages(counts: list[int], usable: list, lower: list, allow_full: bool) -> Iterator[list]:
    """One strategy and recompute mode on every chunk of the split ``counts``."""
    chunks = len(counts)
    bounds = [sum(counts[:i]) for i in range(chunks + 1)]
    modes = list(lower) + ([Recompute.FULL] if allow_full else [])
    for s in usable:
        for r in modes:
            yield [(bounds[j], bounds[j + 1], StageChoice(s, Recompute.NONE if r is Recompute.FULL else r,
                                                            bounds[j + 1] - bounds[j] if r is Recompute.FULL else 0))
                   for j in range(chunks)]


def _stage_choices(usable: list, lower: list, allow_full: bool, n: int) -> Iterator[StageChoice]:
    for s in usable:
        for low in lower:
            for k in range(n + 1 if allow_full else 1):
                yield StageChoice(s, low, k)
        if allow_full and not lower:
            yield StageChoice(s, Recompute.FULL, n)


def _compositions(n: int, parts: int) -> Iterator[list[int]]:
    for cuts in itertools.combinations(range(1, n), parts - 1):
        edges = [0, *cuts, n]
        yield [edges[i + 1] - edges[i] for i in range(parts)]


def brute_force(spec: ModelSpec, cluster: Cluster | Perf, options: SearchOptions, world: int,
                cost_options: CostOptions | None = None) -> list[PlanCost]:
    """Every plan of the space costed, fitting ones only, fastest first."""
    perf = as_perf(cluster)
    budget = perf.memory_bytes * (1 - (cost_options or CostOptions()).memory_headroom) / 2**30
    out = []
    for plan in all_plans(spec, world, perf.gpus_per_node, options):
        cost = cost_plan(plan, spec, perf, cost_options)
        if cost.peak_memory_gib <= budget:
            out.append(cost)
    return sorted(out, key=lambda c: c.step_time_s)


def with_memory(perf: Perf, gib: float) -> Perf:
    """The same machine with ``gib`` GiB usable per device (for tests that make memory bind)."""
    cluster = perf.cluster  # type: ignore[attr-defined]
    gpu = dataclasses.replace(cluster.gpu, memory_gib=gib + cluster.gpu.reserved_gib)
    return dataclasses.replace(perf, cluster=dataclasses.replace(cluster, gpu=gpu))
