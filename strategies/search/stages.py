"""Stage costs for the search, vectorised over candidate strategies.

A :class:`StageTable` holds, for one micro-batch size on one stage size, the cost vector of every
distinct block, of the embedding and of the tail (norm + head) under every candidate strategy and
recompute mode, as numpy arrays with one column per strategy. Range sums come from prefix counts of
each distinct block, so a stage ``[a, b)`` costs a few array operations whatever its length. The
per-layer numbers come from :func:`strategies.cost.layer.core_cost` and
:func:`strategies.cost.layer.zero_terms`, merged exactly as :func:`strategies.cost.layer_cost` merges
them, so the search optimises what :func:`strategies.cost.cost_plan` reports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from galvatron.strategies.cost.layer import (
    LayerContext,
    ZeroTerms,
    accumulated_micro_batches,
    core_cost,
    fsdp_unit,
    recasts,
    stream_bytes,
    tied_copy,
    tied_gradient_sum,
    zero_exposed,
    zero_terms,
)
from galvatron.strategies.cost.model import p2p_time, schedule_overhead
from galvatron.strategies.cost.step import (
    ACT,
    FB,
    GRAD_WORK,
    GRADS,
    STATIC,
    VECTOR_LEN,
    GroupTotals,
    combine,
    grads_persist,
    hidden_behind,
    memory_peak,
)

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


class LayerCache:
    """Per-layer costs shared by every table of one search: the core part keyed by tokens per rank
    and the strategy fields it reads, the ZeRO part by the replica-group fields."""

    def __init__(self) -> None:
        self._core: dict[tuple, tuple[float, ...]] = {}
        self._zero: dict[tuple, ZeroTerms] = {}
        self.evaluations = 0

    def core(self, ctx: LayerContext, layer: LayerSpec, sig: tuple, s: LayerStrategy,
             mode: Recompute) -> tuple[float, ...]:
        """(fwd, bwd, wgrad, bwd_compute, act, work, host_fwd, host_bwd) of :func:`core_cost` for ``s``
        at recompute ``mode``."""
        ep, etp = (s.ep, s.etp) if layer.experts else (1, 0)  # a dense block of a MoE stage: neither
        key = (sig, ctx.micro_batch / s.dp * ctx.seq_len / s.cp, s.tp, s.sp, s.cp, s.cp_kind, s.cp_ulysses, ep, etp,
               mode, stream_bytes(ctx, layer, s), fsdp_unit(s))
        found = self._core.get(key)
        if found is None:
            own = s if (s.recompute, s.ep, s.etp) == (mode, ep, etp) else dataclasses.replace(
                s, recompute=mode, ep=ep, etp=etp)
            c = core_cost(ctx, layer, own)
            found = self._core[key] = (c.fwd, c.bwd, c.wgrad, c.bwd_compute, c.act, c.work, c.host_fwd, c.host_bwd)
            self.evaluations += 1
        return found

    def zero(self, ctx: LayerContext, layer: LayerSpec, sig: tuple, s: LayerStrategy) -> ZeroTerms:
        ep, etp = (s.ep, s.etp) if layer.experts else (1, 0)  # a dense block of a MoE stage: neither
        key = (sig, s.dp, s.cp, s.tp, ep, etp, s.zero, s.offload, accumulated_micro_batches(ctx))
        found = self._zero.get(key)
        if found is None:
            own = s if (s.ep, s.etp) == (ep, etp) else dataclasses.replace(s, ep=ep, etp=etp)
            found = self._zero[key] = zero_terms(ctx, layer, own)
        return found


def _merged(ctx: LayerContext, cores: list[tuple[float, ...]], zeros: list[ZeroTerms],
            recast: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Cost vectors (n, VECTOR_LEN) and transient memory (n,) of core + ZeRO parts, as
    :func:`strategies.cost.layer.apply_zero` adds them (``recast``: per strategy, whether the layer
    holds no autocast casts at this recompute mode, :func:`strategies.cost.layer.recasts`)."""
    fwd, bwd, wgrad, bwdc, act, work, host_f, host_b = np.array(cores, dtype=float).reshape(-1, 8).T
    z = np.array([(t.params + t.optim_states, t.sync, t.post, t.optim, t.rs, t.ag, t.work, t.grads,
                   t.held(r), t.param_fwd, t.param_bwd, t.ag_fwd)
                  for t, r in zip(zeros, recast)], dtype=float).reshape(-1, 12).T
    static, sync, post, optim, rs, ag, zwork, grads, copies, param_fwd, param_bwd, ag_fwd = z
    fwd, bwd, bwdc = fwd + param_fwd, bwd + param_bwd, bwdc + param_bwd
    fwd_x, bwd_x = zero_exposed(ag, rs, fwd, bwdc, ctx.options, ag_fwd)
    vec = np.stack([(fwd + fwd_x) + (bwd + bwd_x), wgrad, bwdc, sync, post, optim, static, act + copies, grads,
                    fwd + fwd_x, host_f, host_b, np.zeros_like(fwd)], axis=1)  # grad_work: tied_gradient_sum
    return vec, np.maximum(work, zwork)


class StageTable:
    """Cost vectors of the blocks, embedding and tail of a model under ``strategies`` at one
    micro-batch size, for each recompute mode in ``modes``; shared by every stage of a pipeline.
    ``pipelined``: the embedding and the head sit on different stages (tied embeddings then cost a
    copy and a gradient all-reduce, :func:`strategies.cost.layer.tied_copy`)."""

    def __init__(self, spec: ModelSpec, ctx: LayerContext, strategies: Sequence[LayerStrategy],
                 modes: Sequence[Recompute], cache: LayerCache, pipelined: bool = False) -> None:
        self.spec, self.ctx, self.strategies = spec, ctx, list(strategies)
        self.num_blocks = spec.num_blocks
        sigs = [signature(b) for b in spec.blocks]
        distinct = list(dict.fromkeys(sigs))
        self.homogeneous = len(distinct) == 1
        index = np.array([distinct.index(sig) for sig in sigs])
        onehot = np.zeros((self.num_blocks, len(distinct)))
        onehot[np.arange(self.num_blocks), index] = 1
        self.counts = np.vstack([np.zeros(len(distinct)), np.cumsum(onehot, axis=0)])
        """Blocks of each distinct kind before position ``i`` (rows 0..L)."""
        reps = [spec.blocks[sigs.index(sig)] for sig in distinct]
        self.vec: dict[Recompute, np.ndarray] = {}
        """Per mode: (distinct blocks, strategies, VECTOR_LEN)."""
        self.work: dict[Recompute, np.ndarray] = {}
        for mode in modes:
            per_sig = [self._layers(layer, sig, mode, cache) for layer, sig in zip(reps, distinct)]
            self.vec[mode] = np.stack([v for v, _ in per_sig])
            self.work[mode] = np.stack([w for _, w in per_sig])
        self.embedding = self._edge((LayerKind.EMBEDDING,), cache)
        """Vectors and transient memory of the embedding and of the tail (never recomputed)."""
        self.tail = self._edge((LayerKind.NORM, LayerKind.HEAD), cache)
        if not pipelined and spec.tied_embeddings:
            sums: dict[tuple, np.ndarray] = {}  # a function of the weight's layout
            for row, x in enumerate(self.strategies):
                if x.weight_layout not in sums:
                    sums[x.weight_layout] = tied_gradient_sum(ctx, spec, x).vector()
                self.embedding[0][row] += sums[x.weight_layout]
        if pipelined and spec.tied_embeddings:
            for edge, holder in ((self.embedding, False), (self.tail, True)):
                copies: dict[tuple, np.ndarray] = {}  # a function of the weight's layout (and cp, ZeRO's span)
                for row, x in enumerate(self.strategies):
                    key = (*x.weight_layout, x.cp)
                    if key not in copies:
                        copies[key] = tied_copy(ctx, spec, x, holder).vector()
                    edge[0][row] += copies[key]
        self.p2p = np.array([p2p_time(ctx, spec.hidden, s) for s in self.strategies])
        self.overhead = schedule_overhead(ctx.options) if pipelined else 0.0
        """The pipeline schedule's host time per chunk and micro-batch (0 without a pipeline)."""
        self.block_floor = {mode: v[:, :, FB].min(axis=0) for mode, v in self.vec.items()}
        """Per mode: the cheapest block's per-micro-batch time under each strategy."""

    @property
    def size(self) -> int:
        return len(self.strategies)

    def _layers(self, layer: LayerSpec, sig: tuple, mode: Recompute,
                cache: LayerCache) -> tuple[np.ndarray, np.ndarray]:
        cores = [cache.core(self.ctx, layer, sig, s, mode) for s in self.strategies]
        zeros = [cache.zero(self.ctx, layer, sig, s) for s in self.strategies]
        return _merged(self.ctx, cores, zeros, [recasts(self.ctx, layer, mode)] * self.size)

    def _edge(self, kinds: tuple[LayerKind, ...], cache: LayerCache) -> tuple[np.ndarray, np.ndarray]:
        vec, work = np.zeros((self.size, VECTOR_LEN)), np.zeros(self.size)
        for kind in kinds:
            for layer in self.spec.layers_of(kind):
                v, w = self._layers(layer, signature(layer), Recompute.NONE, cache)
                vec, work = vec + v, np.maximum(work, w)
        return vec, work

    # ------------------------------------------------------------------ range sums
    def stage_sums(self, a: int, b: int, lower: Recompute, full: np.ndarray,
                   rows: np.ndarray | None = None, first: bool | None = None,
                   last: bool | None = None, interleaved: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Summed vectors, transient memory and p2p time of stages ``[a, b)`` whose first ``full[i]``
        blocks are fully recomputed and the rest run at ``lower``, one per strategy ``rows[i]``
        (every strategy when None); the embedding on the first stage, norm and head on the last
        (``first`` / ``last``: by default the stages that start and end the blocks; a pipeline whose
        first or last stage holds no blocks says which). ``interleaved``: a chunk of an interleaved
        schedule, whose handoff ``CostOptions.overlap_p2p`` runs beside its forward and backward."""
        pick = slice(None) if rows is None else rows
        split = a + full
        c = self.counts
        n_full, n_low = c[split] - c[a], c[b] - c[split]
        vf, vl = self.vec[Recompute.FULL][:, pick], self.vec[lower][:, pick]
        wf, wl = self.work[Recompute.FULL][:, pick], self.work[lower][:, pick]
        if self.homogeneous:
            vec = n_full[:, :1] * vf[0] + n_low[:, :1] * vl[0]
            work = np.maximum(np.where(n_full[:, 0] > 0, wf[0], 0.0), np.where(n_low[:, 0] > 0, wl[0], 0.0))
        else:
            vec = np.einsum("sg,gsf->sf", n_full, vf) + np.einsum("sg,gsf->sf", n_low, vl)
            work = np.maximum(np.where(n_full.T > 0, wf, 0.0).max(axis=0), np.where(n_low.T > 0, wl, 0.0).max(axis=0))
        first = a == 0 if first is None else first
        last = b == self.num_blocks if last is None else last
        if first:
            vec, work = vec + self.embedding[0][pick], np.maximum(work, self.embedding[1][pick])
        if last:
            vec, work = vec + self.tail[0][pick], np.maximum(work, self.tail[1][pick])
        p2p = np.zeros(len(vec)) if last else self.p2p[pick]
        if interleaved and self.ctx.options.overlap_p2p and not last:
            p2p = hidden_behind(p2p, vec[:, FB], self.ctx.options)
        if not first and self.ctx.options.blocking_p2p:  # as cost_plan: the receiving side pays too
            p2p = p2p + self.p2p[pick]
        return vec, work, p2p + self.overhead

    def stage_memory(self, a: int, b: int, lower: Recompute, inflight: float, rows: np.ndarray) -> np.ndarray:
        """Peak memory (k = 0..b-a, rows) of stage [a, b) with its first k blocks fully recomputed."""
        out = np.empty((b - a + 1, len(rows)))
        for k in range(b - a + 1):
            vec, work, _ = self.stage_sums(a, b, lower, np.full(len(rows), k), rows)
            out[k] = self.memory(vec, work, inflight)
        return out

    def memory(self, vec: np.ndarray, work: np.ndarray, inflight: float) -> np.ndarray:
        """Peak memory of stages with summed vectors ``vec`` (see ``memory_peak``)."""
        persist = grads_persist(self.ctx.options, self.ctx.micro_batches)
        return memory_peak(vec[:, STATIC], vec[:, GRADS], inflight * vec[:, ACT], work, persist, vec[:, GRAD_WORK])


def totals(table: StageTable, vec: np.ndarray, work: np.ndarray, p2p: np.ndarray, inflight: float,
           zero_bubble: bool, act: np.ndarray | None = None) -> GroupTotals:
    """Device-group totals for many candidates at once (arrays in every field); ``act``: activation
    bytes in flight counted chunk by chunk (``step.peak_activations``) instead of ``inflight`` times the
    group's."""
    return combine(vec.T, work, p2p, inflight, zero_bubble, table.ctx.options,
                   grads_persist(table.ctx.options, table.ctx.micro_batches), act)
