"""``search``: the fastest plan that fits, exact with respect to the cost model over the space of
:mod:`strategies.search.space`.

For each pipeline degree, micro-batch count and schedule, a dynamic programme over (stage, first
block) keeps the Pareto set of partial pipelines in (sum of bubble weights, max per-micro-batch
time, max bubble weight, max tail): the step time ``m * max t + (sum b - max b) + max e`` grows with
each, so nothing optimal is dropped. Per stage the candidates are every strategy with the fewest
fully recomputed blocks that fit the memory left (time grows with each recomputed block). A branch
whose lower bound already exceeds the K-th best plan found is cut.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from galvatron.strategies.cost.layer import LayerContext
from galvatron.strategies.cost.model import PlanCost, as_perf, cost_plan
from galvatron.strategies.cost.options import CostOptions
from galvatron.strategies.cost.perf import Perf
from galvatron.strategies.cost.step import VECTOR_LEN, GroupTotals, combine, in_flight, step_time
from galvatron.strategies.hardware import Cluster
from galvatron.strategies.search.space import (
    SearchOptions,
    default_global_batch,
    micro_batch_counts,
    pp_candidates,
    recompute_modes,
    strategies,
)
from galvatron.strategies.search.stages import LayerTable, StageChoice, StageEvaluator

from galvatron.errors import MemoryBudgetError
from galvatron.plan import LayerGroup, LayerStrategy, Pipeline, Plan, Recompute, Schedule, Stage, even_split
from galvatron.spec import ModelSpec

_Entry = tuple[float, float, float, float, tuple]


@dataclass(frozen=True)
class SearchResult:
    """The best plans (best first), how many candidates were costed and how long it took."""

    best: PlanCost
    top: tuple[PlanCost, ...]
    plans_costed: int
    search_time_s: float


@dataclass
class _Config:
    pp: int
    m: int
    schedule: Schedule
    v: int


class _Search:
    def __init__(self, spec: ModelSpec, perf: Perf, world: int, options: SearchOptions, cost: CostOptions) -> None:
        self.spec, self.perf, self.world, self.options, self.cost = spec, perf, world, options, cost
        self.global_batch = options.global_batch or default_global_batch(spec, world)
        self.budget = perf.memory_bytes * (1 - cost.memory_headroom)
        self.lower, self.allow_full = recompute_modes(options)
        self.tables: dict[int, LayerTable] = {}
        self.heap: list[tuple[float, int, tuple]] = []
        self.costed = 0
        self.seen = 0
        self.offered: set[tuple] = set()
        self._floors: dict[tuple, float] = {}

    # ---------------------------------------------------------------- bookkeeping
    def bound(self) -> float:
        return -self.heap[0][0] if len(self.heap) >= self.options.top_k else float("inf")

    def offer(self, t: float, config: _Config, stages: tuple) -> None:
        key = (config.pp, config.m, config.schedule, config.v,
               tuple(_groups(self.spec, a, b, c) for a, b, c in stages))
        if key in self.offered:
            return
        self.offered.add(key)
        self.seen += 1
        item = (-t, self.seen, (config, stages))
        if len(self.heap) < self.options.top_k:
            heapq.heappush(self.heap, item)
        elif t < -self.heap[0][0]:
            heapq.heapreplace(self.heap, item)

    def table(self, micro_batch: int) -> LayerTable:
        if micro_batch not in self.tables:
            ctx = LayerContext(perf=self.perf, options=self.cost, dtype=self.options.dtype, seq_len=self.spec.seq_len,
                               causal=self.spec.causal, micro_batch=micro_batch, stage_devices=0)
            self.tables[micro_batch] = LayerTable(self.spec, ctx)
        return self.tables[micro_batch]

    # ---------------------------------------------------------------- driver
    def run(self) -> None:
        """Uniform plans first (cheap, and they give the bound that prunes), then the pipeline DP."""
        for dp_pass in (False, True):
            if dp_pass and self.options.uniform:
                break
            for pp in pp_candidates(self.spec, self.world, self.options):
                devices = self.world // pp
                cands = strategies(self.spec, devices, self.perf.gpus_per_node, self.options)
                for m in micro_batch_counts(self.global_batch, pp, self.options):
                    mb = self.global_batch // m
                    usable = [s for s in cands if mb % s.dp == 0]
                    if usable:
                        self._configs(pp, m, mb, devices, usable, dp_pass)
                self._progress(f"pp={pp}: {self.costed} candidates costed, best {self._best_text()}")

    def _configs(self, pp: int, m: int, mb: int, devices: int, usable: list[LayerStrategy], dp_pass: bool) -> None:
        table = self.table(mb)
        table.ctx = dataclasses.replace(table.ctx, stage_devices=devices)
        for schedule, v in self._schedules(pp, m):
            ev = StageEvaluator(table, schedule is Schedule.ZERO_BUBBLE, self.budget)
            config = _Config(pp, m, schedule, v)
            if dp_pass and v == 1 and pp > 1:
                self._pipeline_dp(config, ev, usable)
            elif not dp_pass:
                self._uniform(config, ev, usable)
            self.costed += ev.combined

    def _schedules(self, pp: int, m: int) -> Iterator[tuple[Schedule, int]]:
        fixed_v = self.options.fixed.get("vpp")
        for schedule in self.options.schedules:
            if not self.options.can(f"schedule:{schedule.value}"):
                continue
            if schedule is Schedule.INTERLEAVED_1F1B:
                if pp == 1 or m % pp:
                    continue
                for v in range(2, self.options.max_vpp + 1):
                    if pp * v <= self.spec.num_blocks and fixed_v in (None, v):
                        yield schedule, v
            elif fixed_v in (None, 1) and (schedule is not Schedule.ZERO_BUBBLE or (pp > 1 and m % pp == 0)):
                yield schedule, 1

    # ---------------------------------------------------------------- uniform plans
    def _uniform(self, config: _Config, ev: StageEvaluator, usable: list[LayerStrategy]) -> None:
        """One strategy and recompute mode everywhere, blocks split evenly over ``pp * v`` chunks."""
        modes = list(self.lower) + ([Recompute.FULL] if self.allow_full else [])
        counts = even_split(self.spec.num_blocks, config.pp * config.v)
        bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
        per_group = -(-self.spec.num_blocks // config.pp)
        for s in usable:
            for r in modes:
                if config.m * per_group * self._fb_per_block(ev, s, r) >= self.bound():
                    continue
                choice = StageChoice(s, r if r is not Recompute.FULL else Recompute.NONE,
                                     0 if r is not Recompute.FULL else -1)
                groups = self._uniform_groups(config, ev, choice, bounds)
                if groups is None:
                    continue
                t = step_time(groups, config.m, config.v)
                if t < self.bound():
                    self.offer(t, config, tuple((bounds[j], bounds[j + 1], _resolve(choice, bounds[j], bounds[j + 1]))
                                                for j in range(len(counts))))

    def _uniform_groups(self, config: _Config, ev: StageEvaluator, choice: StageChoice,
                        bounds: list[int]) -> list[GroupTotals] | None:
        """Device-group totals of an evenly split uniform plan, or None when a group does not fit."""
        pp, v = config.pp, config.v
        out = []
        for g in range(pp):
            sums, work, p2p = np.zeros(VECTOR_LEN), 0.0, 0.0
            for j in range(g, pp * v, pp):
                part, w, p = ev.sums(_resolve(choice, bounds[j], bounds[j + 1]), bounds[j], bounds[j + 1])
                sums = sums + part
                work, p2p = max(work, w), p2p + p
            ev.combined += 1
            tot = combine(sums, work, p2p, in_flight(config.schedule, pp, v, config.m, g), ev.zero_bubble, self.cost)
            if tot.memory > self.budget:
                return None
            out.append(tot)
        return out

    # ---------------------------------------------------------------- non-uniform pipelines
    def _pipeline_dp(self, config: _Config, ev: StageEvaluator, usable: list[LayerStrategy]) -> None:
        L, pp, m = self.spec.num_blocks, config.pp, config.m
        frontier: dict[int, list[_Entry]] = {0: [(0.0, 0.0, 0.0, 0.0, ())]}
        cache: dict[tuple, list[tuple[GroupTotals, StageChoice]]] = {}
        for i in range(pp):
            inflight = in_flight(config.schedule, pp, 1, m, i)
            nxt: dict[int, list[_Entry]] = {}
            for a, entries in frontier.items():
                ends = [L] if i == pp - 1 else range(a + 1, L - (pp - i - 1) + 1)
                for b in ends:
                    if not self._range_possible(ev, usable, a, b, i, config):
                        continue
                    opts = self._stage_options(ev, usable, a, b, inflight, cache, m)
                    self._extend(entries, opts, a, b, m, nxt)
            frontier = {b: _pareto(e) for b, e in nxt.items()}
        for sb, mt, mb_, me, path in frontier.get(L, []):
            self.offer(m * mt + sb - mb_ + me, config, path)

    def _extend(self, entries: list[_Entry], opts: list[tuple[GroupTotals, StageChoice]], a: int, b: int, m: int,
                out: dict[int, list[_Entry]]) -> None:
        bound = self.bound()
        for tot, choice in opts:
            for sb, mt, mb_, me, path in entries:
                cand = (sb + tot.b, max(mt, tot.t), max(mb_, tot.b), max(me, tot.e))
                if m * cand[1] + cand[0] - cand[2] + cand[3] >= bound:
                    continue
                out.setdefault(b, []).append((*cand, (*path, (a, b, choice))))

    def _block_floor(self, ev: StageEvaluator, usable: list[LayerStrategy]) -> float:
        """The least per-micro-batch time of one block over all candidate strategies (a lower bound)."""
        key = (id(ev.table), len(usable), usable[0])
        if key not in self._floors:
            self._floors[key] = min(self._fb_per_block(ev, s, r) for s in usable for r in self._modes())
        return self._floors[key]

    def _modes(self) -> list[Recompute]:
        return list(self.lower) or [Recompute.FULL]

    def _fb_per_block(self, ev: StageEvaluator, s: LayerStrategy, lower: Recompute) -> float:
        """Per-micro-batch time of the cheapest block of the model under ``s`` at recompute ``lower``."""
        sums, _ = ev.table.prefix(ev.table.variant(s, lower))
        return float(np.diff(sums[:, 0]).min())

    def _range_possible(self, ev: StageEvaluator, usable: list[LayerStrategy], a: int, b: int, i: int,
                        config: _Config) -> bool:
        """False when any plan with a stage ``[a, b)`` (or the blocks left after it) is provably slower
        than the K-th best plan found: some stage then runs at least that many blocks per micro-batch."""
        bound = self.bound()
        if bound == float("inf"):
            return True
        floor = config.m * self._block_floor(ev, usable)
        rest, stages_left = self.spec.num_blocks - b, config.pp - i - 1
        busiest = max(b - a, -(-rest // stages_left) if stages_left else 0)
        return busiest * floor < bound

    def _stage_options(self, ev: StageEvaluator, usable: list[LayerStrategy], a: int, b: int, inflight: float,
                       cache: dict, m: int) -> list[tuple[GroupTotals, StageChoice]]:
        """Pareto-best (t, b, e) stage candidates for blocks ``[a, b)``; strategies whose blocks alone
        already take longer than the K-th best plan allows are skipped."""
        L = self.spec.num_blocks
        key = ((b - a, a == 0, b == L) if ev.table.homogeneous else (a, b), inflight)
        if key not in cache:
            found = []
            lowers: list[Recompute | None] = list(self.lower) if self.allow_full or self.lower else []
            if not self.lower and self.allow_full:
                lowers = [None]
            limit = self.bound() / m
            for s in usable:
                for lower in lowers:
                    if (b - a) * self._fb_per_block(ev, s, lower or Recompute.FULL) >= limit:
                        continue
                    hit = ev.best_split(s, lower, a, b, inflight) if (self.allow_full or lower is None) else (
                        _no_full(ev, s, lower, a, b, inflight))
                    if hit is not None:
                        found.append((hit[1], hit[0]))
            cache[key] = _stage_pareto(found)
        return cache[key]

    # ---------------------------------------------------------------- results
    def results(self) -> list[tuple[float, Plan]]:
        ordered = sorted(self.heap, key=lambda item: -item[0])
        return [(-neg, self._plan(*payload)) for neg, _, payload in ordered]

    def _plan(self, config: _Config, stages: tuple) -> Plan:
        built = tuple(Stage(devices=self.world // config.pp, groups=_groups(self.spec, a, b, choice))
                      for a, b, choice in stages)
        return Plan(stages=built, global_batch_size=self.global_batch, num_micro_batches=config.m,
                    pipeline=Pipeline(schedule=config.schedule, virtual_stages=config.v), dtype=self.options.dtype)

    def _best_text(self) -> str:
        if not self.heap:
            return "none fits yet"
        return f"{min(-x[0] for x in self.heap):.3f} s/step"

    def _progress(self, text: str) -> None:
        if self.options.progress is not None:
            self.options.progress(text)


def _no_full(ev: StageEvaluator, s: LayerStrategy, lower: Recompute, a: int, b: int,
             inflight: float) -> tuple[StageChoice, GroupTotals] | None:
    choice = StageChoice(s, lower, 0)
    tot = ev.totals(choice, a, b, inflight)
    return (choice, tot) if tot.memory <= ev.budget else None


def _resolve(choice: StageChoice, a: int, b: int) -> StageChoice:
    """A uniform choice for a concrete stage: ``full == -1`` means every block fully recomputed."""
    return dataclasses.replace(choice, full=b - a) if choice.full < 0 else choice


def _pareto(entries: list[_Entry]) -> list[_Entry]:
    """Entries not dominated in all four criteria."""
    entries.sort(key=lambda x: x[:4])
    kept: list[_Entry] = []
    for e in entries:
        if not any(k[0] <= e[0] and k[1] <= e[1] and k[2] <= e[2] and k[3] <= e[3] for k in kept):
            kept.append(e)
    return kept


def _stage_pareto(found: list[tuple[GroupTotals, StageChoice]]) -> list[tuple[GroupTotals, StageChoice]]:
    found.sort(key=lambda x: (x[0].t, x[0].b, x[0].e))
    kept: list[tuple[GroupTotals, StageChoice]] = []
    for tot, choice in found:
        if not any(k.t <= tot.t and k.b <= tot.b and k.e <= tot.e for k, _ in kept):
            kept.append((tot, choice))
    return kept


def _groups(spec: ModelSpec, a: int, b: int, choice: StageChoice) -> tuple[LayerGroup, ...]:
    """Layer groups of a stage: full recompute first, then the lower level; dense blocks of a stage
    with ep > 1 get ep 1."""
    s = choice.strategy
    parts = [(a, a + choice.full, Recompute.FULL), (a + choice.full, b, choice.lower)]
    out: list[LayerGroup] = []
    for start, end, mode in parts:
        for index in range(start, end):
            strat = dataclasses.replace(s, recompute=mode, ep=s.ep if spec.blocks[index].experts else 1)
            if out and out[-1].strategy == strat:
                out[-1] = LayerGroup(start=out[-1].start, end=index + 1, strategy=strat)
            else:
                out.append(LayerGroup(start=index, end=index + 1, strategy=strat))
    return tuple(out)


def search(spec: ModelSpec, cluster: Cluster | Perf, options: SearchOptions | None = None,
           cost_options: CostOptions | None = None, world_size: int | None = None) -> SearchResult:
    """The fastest plans for ``spec`` on ``cluster`` under ``options``; raises MemoryBudgetError
    (with the memory the leanest plan would need) when nothing fits."""
    options, cost_options = options or SearchOptions(), cost_options or CostOptions()
    start = time.perf_counter()
    perf = as_perf(cluster)
    world = world_size or (cluster.world_size if isinstance(cluster, Cluster) else perf.gpus_per_node)
    s = _Search(spec, perf, world, options, cost_options)
    s.run()
    found = s.results()
    if not found:
        raise MemoryBudgetError(_no_fit_message(spec, perf, s))
    costs = tuple(cost_plan(plan, spec, perf, cost_options) for _, plan in found)
    return SearchResult(best=costs[0], top=costs, plans_costed=s.costed + len(costs),
                        search_time_s=time.perf_counter() - start)


def _no_fit_message(spec: ModelSpec, perf: Perf, s: _Search) -> str:
    """How much memory per GPU the leanest plan of the space would need, against what there is."""
    need = _leanest_memory(s)
    have = s.budget / 2**30
    if need is None:
        return f"{spec.name}: no plan in the search space applies to this model and cluster (check the restrictions)"
    return (f"{spec.name} does not fit on {s.world} GPUs: the leanest plan searched (full recomputation, "
            f"ZeRO-3, deepest pipeline) needs {need:.1f} GiB per GPU, the GPUs have {have:.1f} GiB usable; "
            f"use more or larger GPUs, a smaller global batch, or allow offload")


def _leanest_memory(s: _Search) -> float | None:
    """Smallest peak memory (GiB) over uniform fully-recomputed plans at the smallest micro-batch."""
    best = None
    for pp in pp_candidates(s.spec, s.world, s.options):
        devices = s.world // pp
        m = max(micro_batch_counts(s.global_batch, pp, s.options))
        mb = s.global_batch // m
        table = s.table(mb)
        table.ctx = dataclasses.replace(table.ctx, stage_devices=devices)
        ev = StageEvaluator(table, False, float("inf"))
        counts = even_split(s.spec.num_blocks, pp)
        bounds = [sum(counts[:i]) for i in range(pp + 1)]
        for strat in strategies(s.spec, devices, s.perf.gpus_per_node, s.options):
            if mb % strat.dp:
                continue
            peak = max(ev.totals(StageChoice(strat, Recompute.NONE, bounds[j + 1] - bounds[j]), bounds[j],
                                 bounds[j + 1], in_flight(Schedule.ONE_F_ONE_B, pp, 1, m, j)).memory
                       for j in range(pp))
            best = peak if best is None else min(best, peak)
    return None if best is None else best / 2**30
