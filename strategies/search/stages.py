"""Stage costs for the search: per-layer cost vectors of every candidate strategy, summed over a
range of blocks with prefix sums, combined exactly as :func:`strategies.cost.cost_plan` combines them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from galvatron.strategies.cost.layer import LayerContext, LayerCost, layer_cost
from galvatron.strategies.cost.model import p2p_time
from galvatron.strategies.cost.step import VECTOR_LEN, GroupTotals, combine

from galvatron.plan import LayerStrategy, Recompute
from galvatron.spec import LayerKind, LayerSpec, ModelSpec


@dataclass(frozen=True)
class StageChoice:
    """A stage's strategy: the first ``full`` blocks fully recomputed, the rest at ``lower``."""

    strategy: LayerStrategy
    lower: Recompute
    full: int


def signature(layer: LayerSpec) -> tuple:
    """What a layer's cost depends on (everything but its name)."""
    return tuple(getattr(layer, f.name) for f in dataclasses.fields(layer) if f.name != "name")


class LayerTable:
    """Cost vectors of the blocks, embedding and tail (norm + head) of a model for many strategies,
    at one micro-batch size; shared by every stage of every pipeline degree."""

    def __init__(self, spec: ModelSpec, ctx: LayerContext) -> None:
        self.spec, self.ctx = spec, ctx
        self.blocks = spec.blocks
        self.num_blocks = len(self.blocks)
        self.sigs = [signature(b) for b in self.blocks]
        self._edges: dict[tuple, tuple[tuple[float, ...], float]] = {}
        self._variants: dict[tuple, LayerStrategy] = {}
        self.homogeneous = len(set(self.sigs)) == 1
        self._cache: dict[tuple, LayerCost] = {}
        self._prefix: dict[LayerStrategy, tuple[np.ndarray, list[float]]] = {}
        self.evaluations = 0

    def cost(self, layer: LayerSpec, sig: tuple, s: LayerStrategy) -> LayerCost:
        key = (sig, s)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = layer_cost(self.ctx, layer, _for_layer(layer, s))
            self.evaluations += 1
        return found

    def prefix(self, s: LayerStrategy) -> tuple[np.ndarray, list[float]]:
        """Prefix sums (rows ``0..L``) of block cost vectors and the blocks' transient memory, for ``s``."""
        found = self._prefix.get(s)
        if found is None:
            costs = {sig: self.cost(layer, sig, s) for layer, sig in zip(self.blocks, self.sigs)}
            rows = np.array([costs[sig].vector() for sig in self.sigs])
            sums = np.vstack([np.zeros(VECTOR_LEN), np.cumsum(rows, axis=0)])
            found = self._prefix[s] = (sums, [costs[sig].work for sig in self.sigs])
        return found

    def variant(self, s: LayerStrategy, mode: Recompute) -> LayerStrategy:
        """``s`` with recompute ``mode`` (memoised: building a strategy re-validates it)."""
        key = (s, mode)
        found = self._variants.get(key)
        if found is None:
            found = self._variants[key] = dataclasses.replace(s, recompute=mode)
        return found

    def edge(self, kinds: tuple[LayerKind, ...], s: LayerStrategy) -> tuple[np.ndarray, float]:
        """Summed vector and transient memory of the embedding or the tail (norm, head)."""
        key = (kinds, s)
        if key not in self._edges:
            self._edges[key] = self._edge(kinds, s)
        return self._edges[key]

    def _edge(self, kinds: Sequence[LayerKind], s: LayerStrategy) -> tuple[np.ndarray, float]:
        vec, work = np.zeros(VECTOR_LEN), 0.0
        for kind in kinds:
            for layer in self.spec.layers_of(kind):
                c = self.cost(layer, signature(layer), s)
                vec = vec + np.array(c.vector())
                work = max(work, c.work)
        return tuple(vec), work

    def p2p(self, s: LayerStrategy) -> float:
        return p2p_time(self.ctx, self.spec.hidden, s)


def _for_layer(layer: LayerSpec, s: LayerStrategy) -> LayerStrategy:
    """Expert parallelism applies to MoE blocks only; dense blocks of the stage run with ep 1."""
    return s if layer.experts or s.ep == 1 else dataclasses.replace(s, ep=1)


@dataclass
class StageEvaluator:
    """Totals of a stage ``[a, b)`` for a choice, with the group's in-flight micro-batches."""

    table: LayerTable
    zero_bubble: bool
    budget: float
    combined: int = 0

    def totals(self, choice: StageChoice, a: int, b: int, inflight: float) -> GroupTotals:
        sums, work, p2p = self.sums(choice, a, b)
        self.combined += 1
        return combine(sums, work, p2p, inflight, self.zero_bubble, self.table.ctx.options)

    def sums(self, choice: StageChoice, a: int, b: int) -> tuple[np.ndarray, float, float]:
        """Summed cost vector, transient memory and p2p time of blocks ``[a, b)`` (with the
        embedding at the start of the model and the norm and head at its end)."""
        s = choice.strategy
        full_s = self.table.variant(s, Recompute.FULL)
        low_s = self.table.variant(s, choice.lower)
        split = a + choice.full
        pf, wf = self.table.prefix(full_s)
        pl, wl = self.table.prefix(low_s)
        sums = pf[split] - pf[a] + pl[b] - pl[split]
        work = max(wf[a:split] + wl[split:b] + [0.0])
        last = b == self.table.num_blocks
        for present, kinds, strategy in ((a == 0, (LayerKind.EMBEDDING,), full_s if choice.full else low_s),
                                         (last, (LayerKind.NORM, LayerKind.HEAD), low_s if split < b else full_s)):
            if present:
                vec, w = self.table.edge(kinds, strategy)
                sums = sums + vec
                work = max(work, w)
        return sums, work, 0.0 if last else self.table.p2p(s)

    def best_split(self, s: LayerStrategy, lower: Recompute | None, a: int, b: int,
                   inflight: float) -> tuple[StageChoice, GroupTotals] | None:
        """The fewest fully recomputed leading blocks that fit (time grows with each one), or None.
        ``lower`` None: every block fully recomputed."""
        n = b - a
        if lower is None:
            choice = StageChoice(s, Recompute.FULL, n)
            tot = self.totals(choice, a, b, inflight)
            return (choice, tot) if tot.memory <= self.budget else None
        for k in self._k_order(s, lower, a, b, inflight):
            choice = StageChoice(s, lower, k)
            tot = self.totals(choice, a, b, inflight)
            if tot.memory <= self.budget:
                return choice, tot
        return None

    def _k_order(self, s: LayerStrategy, lower: Recompute, a: int, b: int, inflight: float) -> list[int]:
        """Candidate counts of fully recomputed blocks, fewest first. Homogeneous blocks: memory
        falls monotonically from k = 1 on, so a binary search finds the least k that fits."""
        n = b - a
        if not self.table.homogeneous or n <= 2:
            return list(range(n + 1))
        if self.totals(StageChoice(s, lower, 0), a, b, inflight).memory <= self.budget:
            return [0]
        lo, hi = 1, n
        if self.totals(StageChoice(s, lower, hi), a, b, inflight).memory > self.budget:
            return []
        while lo < hi:
            mid = (lo + hi) // 2
            if self.totals(StageChoice(s, lower, mid), a, b, inflight).memory <= self.budget:
                hi = mid
            else:
                lo = mid + 1
        return [lo]
