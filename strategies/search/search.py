"""``search``: the fastest plan that fits, exact with respect to the cost model over the space of
:mod:`strategies.search.space`.

Every candidate strategy is costed at once, as numpy columns of a
:class:`~strategies.search.stages.StageTable` (one per stage size and micro-batch size; per-layer
costs are computed once per distinct block, tokens per rank and strategy, and shared). Uniform
plans come first: they are cheap and give the bound that prunes. Then, for each pipeline degree
(one too: a single stage may recompute only its first blocks fully), micro-batch count and
schedule, a dynamic programme over (stage, first block) keeps the Pareto set
of partial pipelines in (sum of bubble weights, max per-micro-batch time, max bubble weight, max
tail): the step time ``m * max t + (sum b - max b) + max e`` grows with each, so nothing optimal is
dropped. Per stage the candidates are every strategy with the fewest fully recomputed blocks that
fit the memory (time grows with each recomputed block), Pareto-filtered in (t, b, e). A branch whose
lower bound (its own terms plus the fastest conceivable blocks left) already reaches the K-th best
plan found is cut; so is a strategy whose blocks alone are too slow. For a model with tied input
and output embeddings the first and last stages share one weight layout (the runtime needs it:
``LayerStrategy.weight_layout``): partial pipelines carry their first stage's layout, are
Pareto-filtered per layout, and end in a last stage of that layout.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from galvatron.strategies.cost.layer import LayerContext
from galvatron.strategies.cost.model import PlanCost, as_perf, cost_plan
from galvatron.strategies.cost.options import CostOptions
from galvatron.strategies.cost.perf import Perf
from galvatron.strategies.cost.step import ACT, chunk_in_flight, in_flight, peak_activations, step_times
from galvatron.strategies.hardware import Cluster
from galvatron.strategies.search.space import (
    SearchOptions,
    default_global_batch,
    interleaved_splits,
    micro_batch_counts,
    pp_candidates,
    recompute_modes,
    strategies,
)
from galvatron.strategies.search.stages import LayerCache, StageChoice, StageTable, totals

from galvatron.errors import MemoryBudgetError
from galvatron.plan import LayerGroup, LayerStrategy, Pipeline, Plan, Recompute, Schedule, Stage, even_split
from galvatron.spec import ModelSpec


@dataclass(frozen=True)
class SearchResult:
    """The best plans (best first), how many candidates were costed and how long it took.
    ``plans_costed`` counts whole uniform plans and stage candidates (a strategy with a number of
    fully recomputed blocks on a block range) whose time and memory were evaluated."""

    best: PlanCost
    top: tuple[PlanCost, ...]
    plans_costed: int
    search_time_s: float


@dataclass(frozen=True)
class _Config:
    pp: int
    m: int
    schedule: Schedule
    v: int


@dataclass
class _Options:
    """Pareto-best candidates for one stage: arrays ``t``, ``b``, ``e`` and the choices."""

    t: np.ndarray
    b: np.ndarray
    e: np.ndarray
    choices: list[StageChoice]


@dataclass
class _Front:
    """Partial pipelines ending at one block: (sum b, max t, max b, max e), the weight layout tag
    of their first stage (tied embeddings; else 0) and their stages, each a linked path
    ``(previous path, (a, b, choice))`` (None: no stage yet; :func:`_unroll` makes it a tuple)."""

    sb: np.ndarray
    mt: np.ndarray
    mb: np.ndarray
    me: np.ndarray
    tag: np.ndarray
    paths: list[Any]

    def subset(self, keep: np.ndarray) -> _Front:
        return _Front(self.sb[keep], self.mt[keep], self.mb[keep], self.me[keep], self.tag[keep],
                      [self.paths[i] for i in keep])


class _Search:
    def __init__(self, spec: ModelSpec, perf: Perf, world: int, options: SearchOptions, cost: CostOptions) -> None:
        self.spec, self.perf, self.world, self.options, self.cost = spec, perf, world, options, cost
        self.global_batch = options.global_batch or default_global_batch(spec, world)
        self.budget = perf.memory_bytes * (1 - cost.memory_headroom)
        self.lower, self.allow_full = recompute_modes(options)
        self.cache = LayerCache()
        self.tables: dict[tuple[int, int], StageTable] = {}
        self.heap: list[tuple[float, int, tuple]] = []
        self.costed = 0
        self.seen = 0
        self.offered: set[tuple] = set()

    # ---------------------------------------------------------------- bookkeeping
    def bound(self) -> float:
        return -self.heap[0][0] if len(self.heap) >= self.options.top_k else math.inf

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

    def table(self, devices: int, micro_batch: int, usable: list[LayerStrategy]) -> StageTable:
        key = (devices, micro_batch)
        if key not in self.tables:
            ctx = LayerContext(perf=self.perf, options=self.cost, dtype=self.options.dtype, seq_len=self.spec.seq_len,
                               causal=self.spec.causal, micro_batch=micro_batch, stage_devices=devices,
                               micro_batches=max(self.global_batch // micro_batch, 1))
            # a fully recomputed stage's blocks run at none below full (summed zero times, but summed)
            modes = list(dict.fromkeys([*self.lower, *([Recompute.NONE] if self.allow_full else []), Recompute.FULL]))
            self.tables[key] = StageTable(self.spec, ctx, usable, modes, self.cache, pipelined=devices < self.world)
        return self.tables[key]

    # ---------------------------------------------------------------- driver
    def configs(self) -> Iterator[tuple[int, int, StageTable]]:
        """(pp, micro-batch count, table) for every pipeline degree and micro-batch count with strategies."""
        for pp in pp_candidates(self.spec, self.world, self.options):
            devices = self.world // pp
            cands = strategies(self.spec, devices, self.perf.gpus_per_node, self.options)
            for m in micro_batch_counts(self.global_batch, pp, self.options):
                mb = self.global_batch // m
                usable = [s for s in cands if mb % s.dp == 0]
                if usable:
                    yield pp, m, self.table(devices, mb, usable)

    def run(self) -> None:
        """Uniform plans first (cheap, and they give the bound that prunes), then the pipeline DP."""
        configs = list(self.configs())
        for pp, m, table in configs:
            for schedule, v in self._schedules(pp, m):
                self._uniform(_Config(pp, m, schedule, v), table)
        self._progress(f"uniform plans: {self.costed} candidates costed, best {self._best_text()}")
        if self.options.uniform:
            return
        for pp, m, table in sorted(configs, key=lambda c: self._config_floor(*c)):
            for schedule, v in self._schedules(pp, m):
                if v == 1:
                    self._pipeline_dp(_Config(pp, m, schedule, v), table)
        self._progress(f"pipelines: {self.costed} candidates costed, best {self._best_text()}")

    def _schedules(self, pp: int, m: int) -> Iterator[tuple[Schedule, int]]:
        fixed_v = self.options.fixed.get("vpp")
        for schedule in self.options.schedules:
            if not self.options.can(f"schedule:{schedule.value}"):
                continue
            if schedule is Schedule.INTERLEAVED_1F1B:
                if pp == 1 or m % pp:
                    continue
                for v in range(2, self.options.max_vpp + 1):
                    if interleaved_splits(self.spec.num_blocks, pp * v, self.options.uniform) and fixed_v in (None, v):
                        yield schedule, v
            elif fixed_v in (None, 1) and (schedule is not Schedule.ZERO_BUBBLE or (pp > 1 and m % pp == 0)):
                yield schedule, 1

    def _floor(self, table: StageTable) -> float:
        """The least per-micro-batch time of one block under any strategy and recompute mode."""
        return float(min(f.min() for f in table.block_floor.values()))

    def _config_floor(self, pp: int, m: int, table: StageTable) -> float:
        """A lower bound on any plan's step at (pp, m): the busiest group runs L / pp blocks m times."""
        return m * math.ceil(self.spec.num_blocks / pp) * self._floor(table)

    # ---------------------------------------------------------------- uniform plans
    def _uniform(self, config: _Config, table: StageTable) -> None:
        """One strategy and recompute mode everywhere, blocks split evenly over ``pp * v`` chunks:
        every strategy of the table at once. Interleaved schedules try every split of
        :func:`interleaved_splits`: extra blocks first or last (the first chunks are the ones the
        schedule holds longest, ``chunk_in_flight``; the last group runs the head), the embedding,
        and the norm and head, in chunks of their own, or counted as a block each."""
        if config.v == 1:
            self._uniform_split(config, table, even_split(self.spec.num_blocks, config.pp))
            return
        for split in interleaved_splits(self.spec.num_blocks, config.pp * config.v, self.options.uniform):
            self._uniform_split(config, table, split)

    def _uniform_split(self, config: _Config, table: StageTable, counts: list[int]) -> None:
        pp, v, m = config.pp, config.v, config.m
        if self._config_floor(pp, m, table) >= self.bound():
            return
        bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
        zb = config.schedule is Schedule.ZERO_BUBBLE
        levels, allow_full = recompute_modes(self.options, config.schedule)
        for mode in [*levels, *([Recompute.FULL] if allow_full else [])]:
            lower = Recompute.NONE if mode is Recompute.FULL else mode
            t, b, e = (np.empty((pp, table.size)) for _ in range(3))
            fits = np.ones(table.size, dtype=bool)
            chunks: dict[tuple, tuple] = {}
            for g in range(pp):
                vec, work, p2p, held = 0.0, 0.0, 0.0, []
                for j in range(g, pp * v, pp):
                    lo, hi = bounds[j], bounds[j + 1]
                    ends = (j == 0, j == pp * v - 1)  # the embedding's chunk, the head's
                    key = (hi - lo, *ends) if table.homogeneous else (lo, hi, *ends)
                    if key not in chunks:
                        n = hi - lo if mode is Recompute.FULL else 0
                        chunks[key] = table.stage_sums(lo, hi, lower, np.full(table.size, n), None, *ends,
                                                       interleaved=v > 1)
                    part, w, p = chunks[key]
                    vec, work, p2p = vec + part, np.maximum(work, w), p2p + p
                    held.append(part[:, ACT])
                act = peak_activations(chunk_in_flight(config.schedule, pp, v, m, g), held)
                tot = totals(table, vec, work, p2p, 0.0, zb, act)
                t[g], b[g], e[g] = tot.t, tot.b, tot.e
                fits &= tot.memory <= self.budget
            self.costed += table.size
            step = np.where(fits, step_times(t, b, e, m, v), math.inf)
            for i in np.argsort(step)[:self.options.top_k]:
                if step[i] >= self.bound():
                    break
                choice = StageChoice(table.strategies[i], lower, 0)
                stages = tuple((bounds[j], bounds[j + 1], dataclasses.replace(
                    choice, full=bounds[j + 1] - bounds[j] if mode is Recompute.FULL else 0)) for j in range(pp * v))
                self.offer(float(step[i]), config, stages)

    # ---------------------------------------------------------------- non-uniform pipelines
    def _pipeline_dp(self, config: _Config, table: StageTable) -> None:
        """The DP over (stage, first block). Tied embeddings: the first stage's options are taken
        per weight layout, each partial pipeline carries its layout's tag (Pareto sets are kept
        per tag), and the last stage takes only options of its pipeline's tag."""
        L, pp, m = table.num_blocks, config.pp, config.m
        if self._config_floor(pp, m, table) >= self.bound():
            return
        zb = config.schedule is Schedule.ZERO_BUBBLE
        floor = self._floor(table)
        layouts = _tied_ends(self.spec, table)
        cache: dict[tuple, Any] = {}
        frontier = {0: _Front(*(np.zeros(1) for _ in range(4)), tag=np.zeros(1, dtype=int), paths=[None])}
        for i in range(pp):
            inflight = in_flight(config.schedule, pp, 1, m, i)
            left = pp - i - 1
            nxt: dict[int, list] = {}
            for a, front in frontier.items():
                ends = [L] if left == 0 else range(a + 1, L - left + 1)
                for b in ends:
                    rest = L - b
                    t_floor = math.ceil(rest / left) * floor if left else 0.0
                    if m * max((b - a) * floor, t_floor) >= self.bound():
                        continue
                    b_floor = 0.0 if zb else rest * floor
                    if layouts is None or 0 < a < b < L:
                        opts = self._stage_options(table, a, b, inflight, zb, cache, m)
                        if opts.t.size:
                            self._extend(front, opts, a, b, m, t_floor, b_floor, nxt)
                        continue
                    for tag, mask in layouts:
                        part = front if a == 0 else front.subset(np.nonzero(front.tag == tag)[0])
                        opts = self._stage_options(table, a, b, inflight, zb, cache, m, (tag, mask))
                        if opts.t.size and part.tag.size:
                            self._extend(part, opts, a, b, m, t_floor, b_floor, nxt, tag if a == 0 else None)
            frontier = {b: _pareto_front(parts) for b, parts in nxt.items()}
        done = frontier.get(L)
        if done is None:
            return
        step = m * done.mt + done.sb - done.mb + done.me
        for i in np.argsort(step)[:self.options.top_k]:
            if step[i] < self.bound():
                self.offer(float(step[i]), config, _unroll(done.paths[i]))

    def _extend(self, front: _Front, opts: _Options, a: int, b: int, m: int, t_floor: float, b_floor: float,
                out: dict[int, list], tag: int | None = None) -> None:
        """Partial pipelines ``front`` followed by each stage option on [a, b), those that can still
        beat the bound: the final max t is at least ``t_floor``, and the remaining stages add at least
        min(b_floor, max b) to (sum b - max b). They keep their tag, or take ``tag``."""
        sb = front.sb[:, None] + opts.b[None, :]
        mt = np.maximum(front.mt[:, None], opts.t[None, :])
        mb = np.maximum(front.mb[:, None], opts.b[None, :])
        me = np.maximum(front.me[:, None], opts.e[None, :])
        low = m * np.maximum(mt, t_floor) + sb - mb + np.minimum(b_floor, mb) + me
        ei, oi = np.nonzero(low < self.bound())
        if ei.size:
            tags = front.tag[ei] if tag is None else np.full(ei.size, tag)
            paths, choices = front.paths, opts.choices

            def make(picked: np.ndarray) -> list[Any]:  # paths only for the candidates the Pareto filter keeps
                return [(paths[ei[j]], (a, b, choices[oi[j]])) for j in picked]

            out.setdefault(b, []).append((sb[ei, oi], mt[ei, oi], mb[ei, oi], me[ei, oi], tags, make))

    def _stage_options(self, table: StageTable, a: int, b: int, inflight: float, zb: bool,
                       cache: dict[tuple, Any], m: int, only: tuple[int, np.ndarray] | None = None) -> _Options:
        """Pareto-best (t, b, e) stage candidates for blocks [a, b): per strategy and lower recompute
        level, the fewest fully recomputed leading blocks that fit. Strategies whose blocks alone
        already take longer than the K-th best plan allows are skipped; with ``only`` (tag, mask
        over the table's rows), strategies outside the mask too (the candidates are costed once
        for every mask: only the Pareto filter runs per mask)."""
        shape = (b - a, a == 0, b == table.num_blocks) if table.homogeneous else (a, b)
        key = (shape, inflight, None if only is None else only[0])
        if key in cache:
            return cache[key]
        raw = (shape, inflight, "candidates")
        if raw not in cache:
            cache[raw] = self._stage_candidates(table, a, b, inflight, zb, m)
        cache[key] = _stage_pareto(cache[raw], None if only is None else only[1])
        return cache[key]

    def _stage_candidates(self, table: StageTable, a: int, b: int, inflight: float, zb: bool, m: int
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[StageChoice]]:
        """Every stage candidate of :meth:`_stage_options`, unfiltered: arrays t, b, e, the table
        row of each, and the choices."""
        limit = self.bound() / m
        found = []
        lower_levels, allow_full = recompute_modes(self.options, Schedule.ZERO_BUBBLE if zb else None)
        lowers: list[Recompute | None] = list(lower_levels) or ([None] if allow_full else [])
        for lower in lowers:
            rows = np.nonzero((b - a) * table.block_floor[lower or Recompute.FULL] < limit)[0]
            if not rows.size:
                continue
            rows, k = self._fewest_full(table, a, b, lower, inflight, rows, allow_full)
            if not rows.size:
                continue
            vec, work, p2p = table.stage_sums(a, b, lower or Recompute.NONE, k, rows)
            tot = totals(table, vec, work, p2p, inflight, zb)
            found.append((tot.t, tot.b, tot.e, [StageChoice(table.strategies[r], lower or Recompute.NONE, int(x))
                                                for r, x in zip(rows, k)], rows))
        if not found:
            return np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, dtype=int), []
        t, b_, e = (np.concatenate([np.broadcast_to(f[i], np.shape(f[0])) for f in found]) for i in range(3))
        return t, b_, e, np.concatenate([f[4] for f in found]), [c for f in found for c in f[3]]

    def _fewest_full(self, table: StageTable, a: int, b: int, lower: Recompute | None, inflight: float,
                     rows: np.ndarray, allow_full: bool) -> tuple[np.ndarray, np.ndarray]:
        """Rows that fit with some number of fully recomputed leading blocks, and that least number.
        Homogeneous blocks: memory falls monotonically from one recomputed block on, so a bisection
        per row finds it; otherwise every count is tried."""
        n = b - a
        if lower is None:
            k = np.full(rows.size, n)
            ok = self._memory(table, a, b, Recompute.NONE, k, inflight, rows) <= self.budget
            return rows[ok], k[ok]
        if not allow_full:
            k = np.zeros(rows.size, dtype=int)
            ok = self._memory(table, a, b, lower, k, inflight, rows) <= self.budget
            return rows[ok], k[ok]
        if not table.homogeneous:
            mem = table.stage_memory(a, b, lower, inflight, rows)
            self.costed += mem.size
            fits = mem <= self.budget
            ok = fits.any(axis=0)
            return rows[ok], fits.argmax(axis=0)[ok]
        fit0 = self._memory(table, a, b, lower, np.zeros(rows.size, dtype=int), inflight, rows) <= self.budget
        fitn = self._memory(table, a, b, lower, np.full(rows.size, n), inflight, rows) <= self.budget
        ok = fit0 | fitn
        lo = np.where(fit0, 0, 1)[ok]
        hi = np.where(fit0, 0, n)[ok]
        rows = rows[ok]
        while (lo < hi).any():
            mid = (lo + hi) // 2
            fits = self._memory(table, a, b, lower, mid, inflight, rows) <= self.budget
            hi, lo = np.where(fits, mid, hi), np.where(fits, lo, mid + 1)
        return rows, lo

    def _memory(self, table: StageTable, a: int, b: int, lower: Recompute, k: np.ndarray, inflight: float,
                rows: np.ndarray) -> np.ndarray:
        vec, work, _ = table.stage_sums(a, b, lower, k, rows)
        self.costed += rows.size
        return table.memory(vec, work, inflight)

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


def _pareto_mask(points: np.ndarray) -> np.ndarray:
    """Indices of rows of ``points`` (n, d) not dominated (<= in every column) by another row;
    of equal rows the first is kept."""
    order = np.lexsort(points.T[::-1])
    remaining = order
    kept = []
    while remaining.size:
        first = remaining[0]
        kept.append(first)
        dominated = (points[remaining] >= points[first]).all(axis=1)
        remaining = remaining[~dominated]
    return np.array(kept, dtype=int)


def _stage_pareto(found: tuple, mask: np.ndarray | None = None) -> _Options:
    """The Pareto-best of stage candidates (t, b, e, rows, choices), of those whose table row is
    in ``mask`` when given."""
    t, b, e, rows, choices = found
    candidates = np.arange(t.size) if mask is None else np.nonzero(mask[rows])[0]
    if not candidates.size:
        return _Options(np.zeros(0), np.zeros(0), np.zeros(0), [])
    keep = candidates[_pareto_mask(np.stack([t[candidates], b[candidates], e[candidates]], axis=1))]
    return _Options(t[keep], b[keep], e[keep], [choices[i] for i in keep])


def _pareto_front(parts: list[tuple]) -> _Front:
    """The partial pipelines of ``parts`` (sb, mt, mb, me, tags, make: the paths of the picked
    candidates) not dominated by one of the same tag; paths are made for those kept only."""
    sb, mt, mb, me, tag = (np.concatenate([p[i] for p in parts]) for i in range(5))
    points = np.stack([sb, mt, mb, me], axis=1)
    groups = [np.arange(tag.size)] if (tag == tag[0]).all() else [np.nonzero(tag == t)[0] for t in np.unique(tag)]
    keep = np.sort(np.concatenate([g[_pareto_mask(points[g])] for g in groups]))
    starts = np.cumsum([0] + [len(p[0]) for p in parts])
    owner = np.searchsorted(starts, keep, side="right") - 1
    paths = [path for k, p in enumerate(parts) if (owner == k).any() for path in p[5](keep[owner == k] - starts[k])]
    return _Front(sb[keep], mt[keep], mb[keep], me[keep], tag[keep], paths)


def _unroll(path: Any) -> tuple:
    """The stages of a linked path of :class:`_Front`, first to last."""
    stages = []
    while path is not None:
        path, stage = path
        stages.append(stage)
    return tuple(reversed(stages))


def _tied_ends(spec: ModelSpec, table: StageTable) -> list[tuple[int, np.ndarray]] | None:
    """For tied embeddings, each weight layout (``LayerStrategy.weight_layout``) the first and
    last stages of a pipeline may share, with a mask of its rows of ``table`` (the runtime adds
    the two copies' gradient shards rank by rank); None for untied ones."""
    if not spec.tied_embeddings:
        return None
    layouts = [s.weight_layout for s in table.strategies]
    return [(tag, np.array([x == layout for x in layouts])) for tag, layout in enumerate(dict.fromkeys(layouts))]


def _groups(spec: ModelSpec, a: int, b: int, choice: StageChoice) -> tuple[LayerGroup, ...]:
    """Layer groups of a stage: full recompute first, then the lower level; dense blocks of a stage
    with ep > 1 or an expert TP of its own get ep 1, etp 0. A stage without blocks (the embedding,
    or the norm and head, alone) is one empty group, its strategy that of a dense block."""
    s = choice.strategy
    if a == b:
        return (LayerGroup(start=a, end=b, strategy=dataclasses.replace(s, recompute=choice.lower, ep=1, etp=0)),)
    parts = [(a, a + choice.full, Recompute.FULL), (a + choice.full, b, choice.lower)]
    out: list[LayerGroup] = []
    for start, end, mode in parts:
        for index in range(start, end):
            moe = bool(spec.blocks[index].experts)
            strat = dataclasses.replace(s, recompute=mode, ep=s.ep if moe else 1, etp=s.etp if moe else 0)
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
    leanest = _leanest_memory(s)
    have = s.budget / 2**30
    if leanest is None:
        return f"{spec.name}: no plan in the search space applies to this model and cluster (check the restrictions)"
    need, mode = leanest
    how = {Recompute.FULL: "full recomputation", Recompute.SELECTIVE: "selective recomputation, full not allowed",
           Recompute.NONE: "no recomputation, the only mode allowed"}[mode]
    advice = "use more or larger GPUs, a smaller global batch, or allow offload"
    if mode is not Recompute.FULL:
        advice += " or full recomputation"
    return (f"{spec.name} does not fit on {s.world} GPUs: the leanest plan searched ({how}; its leanest "
            f"ZeRO stage, pipeline and schedule) needs {_gib(need)} GiB per GPU, the GPUs have {_gib(have)} GiB "
            f"usable; {advice}")


def _gib(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.3g}"


def _leanest_memory(s: _Search) -> tuple[float, Recompute] | None:
    """Smallest peak memory (GiB) over uniform plans at the smallest micro-batch some strategy's
    data parallelism divides, under the leanest recompute mode the options allow (full, else
    selective, else none) and the fewest in-flight micro-batches of the schedules they allow (blocks
    split evenly over the pipeline's devices); None if no plan applies."""
    lower, allow_full = recompute_modes(s.options)
    mode = Recompute.FULL if allow_full else Recompute.SELECTIVE if Recompute.SELECTIVE in lower else (
        Recompute.NONE if lower else None)
    if mode is None:
        return None
    best = None
    for pp in pp_candidates(s.spec, s.world, s.options):
        devices = s.world // pp
        cands = strategies(s.spec, devices, s.perf.gpus_per_node, s.options)
        for m in sorted(micro_batch_counts(s.global_batch, pp, s.options), reverse=True):
            mb = s.global_batch // m
            usable = [x for x in cands if mb % x.dp == 0]
            if usable:
                break
        else:
            continue
        schedules = list(s._schedules(pp, m))
        if not schedules:
            continue
        table = s.table(devices, mb, usable)
        counts = even_split(s.spec.num_blocks, pp)
        bounds = [sum(counts[:i]) for i in range(pp + 1)]
        peak = np.zeros(table.size)
        for j in range(pp):
            full = np.full(table.size, counts[j] if mode is Recompute.FULL else 0)
            level = Recompute.NONE if mode is Recompute.FULL else mode
            vec, work, _ = table.stage_sums(bounds[j], bounds[j + 1], level, full)
            inflight = min(in_flight(schedule, pp, v, m, j) for schedule, v in schedules)
            peak = np.maximum(peak, table.memory(vec, work, inflight))
        best = float(peak.min()) if best is None else min(best, float(peak.min()))
    return None if best is None else (best / 2**30, mode)
