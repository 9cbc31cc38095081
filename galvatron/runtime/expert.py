"""Expert parallelism: token dispatch and combine over an expert-parallel group (GShard, Lepikhin et al. 2020).

A MoE layer with ``E`` routed experts runs on an expert-parallel (EP) group of ``ep`` ranks; rank
``r`` of the group holds experts ``r * E/ep .. (r+1) * E/ep - 1``. Every rank routes its own tokens,
sends each (token, expert) assignment to the rank that holds the expert with an uneven all-to-all
(*dispatch*; the per-expert counts are exchanged first), runs its local experts on what arrived,
and sends the results back with the reverse all-to-all (*combine*), where they are weighted by
the router and summed per token.

The EP group is folded over the layer's data- (and context-) parallel ranks (Megatron's MoE
Parallel Folding, Liu et al. 2025): of the layer's ``dp * cp`` ranks, consecutive blocks of ``ep``
form the EP groups (:func:`expert_rank_grid`) and the ranks holding the same experts, one per EP
group, form the *expert data-parallel* group of ``dp * cp / ep`` ranks. Non-expert parameters keep
their gradient reduction over all ``dp * cp`` ranks; expert gradients are summed over the expert
data-parallel group and divided by ``dp * cp`` (not by its size: each expert already saw the tokens
of ``ep`` ranks). With an expert TP of its own (``etp``, :func:`folded_rank_grid`), ETP, EP and expert
data parallelism instead take Megatron-Core's order over all the layer's ``dp * tp * cp`` ranks.

Experts may also be split over a tensor-parallel group (expert TP) whose ranks hold the same tokens:
each expert is a Megatron column/row-parallel MLP, with :func:`copy_to_tp` / :func:`reduce_from_tp`
(Megatron's f and g, Shoeybi et al. 2019) applied once per layer on the tokens and the router weights
before the dispatch and on the combined output after it.

Two modes: dropless (every assignment reaches its expert) and capacity, where each expert takes at
most ``ceil(capacity_factor * tokens * top_k / experts)`` assignments from a rank (Switch Transformer,
Fedus et al. 2021, eq. 3) and the rest are dropped (their slot contributes zero).

Every collective is skipped when its group has one rank; a group of ``None`` means one rank too.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from galvatron.errors import PlanError

Group = dist.ProcessGroup | None
"""A process group; ``None`` means a group of one rank (this one), never the default group."""


class DropPolicy(enum.StrEnum):
    """Which assignments an expert keeps when more than its capacity arrive."""

    PROBS = "probs"  # the highest router weights (Megatron-Core's default drop policy)
    POSITION = "position"  # the earliest tokens (GShard / Switch Transformer)


def group_size(group: Group) -> int:
    """Ranks in ``group`` (1 for ``None``)."""
    return 1 if group is None else group.size()


def group_rank(group: Group) -> int:
    """This rank's index in ``group`` (0 for ``None``)."""
    return 0 if group is None else group.rank()


# ------------------------------------------------------------------------------------------ rank grid
def expert_rank_grid(token_ranks: Sequence[int], ep: int) -> tuple[list[list[int]], list[list[int]]]:
    """EP groups and expert data-parallel groups of one layer whose tokens are spread over ``token_ranks``.

    ``token_ranks`` are the layer's ``dp * cp`` ranks that share one tensor-parallel index (in their
    data-/context-parallel order). EP groups are consecutive blocks of ``ep`` of them, so they stay
    inside a node when the node's ranks are consecutive; expert data-parallel groups take one rank
    of each block.
    """
    n = len(token_ranks)
    if ep < 1 or n % ep:
        raise PlanError("ep", f"{ep} does not divide the {n} data/context-parallel ranks of the layer")
    ranks = list(token_ranks)
    ep_groups = [ranks[i : i + ep] for i in range(0, n, ep)]
    expert_dp_groups = [ranks[i::ep] for i in range(ep)]
    return ep_groups, expert_dp_groups


@dataclass(frozen=True)
class FoldedRanks:
    """The rank groups of one MoE layer under MoE Parallel Folding (an expert TP ``etp`` of its own)."""

    etp: list[list[int]]
    """Expert tensor-parallel groups: ``etp`` adjacent ranks, which route the same tokens."""
    ep: list[list[int]]
    """Expert-parallel groups: ``ep`` ranks ``etp`` apart."""
    expert_dp: list[list[int]]
    """Ranks holding the same expert slices: ``n / (etp * ep)`` ranks ``etp * ep`` apart."""
    chunks: list[list[int]]
    """Per tensor-parallel group, its ranks of one ETP index (``tp / etp`` ranks ``etp`` apart, in
    sequence order): each ETP group routes its chunk of the layer's sequence, and these ranks
    assemble the chunks' outputs."""


def folded_rank_grid(layer_ranks: Sequence[int], tp: int, etp: int, ep: int) -> FoldedRanks:
    """Megatron-Core's expert rank order (ETP innermost, then EP, then expert DP; MoE Parallel Folding,
    Liu et al. 2025) over a layer's ``dp * cp * tp`` ranks in the runtime's ``(d, c, t)`` order.

    ``etp`` must divide ``tp``: an ETP group then lies inside one tensor-parallel group, whose ranks
    hold the same tokens; its ``etp`` ranks take the sequence chunk ``t // etp`` of those tokens.
    """
    n = len(layer_ranks)
    if etp < 1 or tp % etp:
        raise PlanError("etp", f"{etp} does not divide tp {tp}: an expert TP group must lie inside one "
                        "tensor-parallel group")
    if ep < 1 or n % (etp * ep) or n % tp:
        raise PlanError("etp", f"etp {etp} x ep {ep} does not divide the layer's {n} ranks")
    r, block = list(layer_ranks), etp * ep
    return FoldedRanks(
        etp=[r[i : i + etp] for i in range(0, n, etp)],
        ep=[r[b + j : b + block : etp] for b in range(0, n, block) for j in range(etp)],
        expert_dp=[r[i::block] for i in range(block)],
        chunks=[r[g + j : g + tp : etp] for g in range(0, n, tp) for j in range(etp)])


@dataclass(frozen=True, kw_only=True)
class ExpertGroups:
    """This rank's process groups for one expert-parallel layout."""

    ep: Group
    """Ranks that exchange tokens; each holds ``experts / ep`` of the experts."""
    expert_dp: Group
    """Ranks holding the same experts: expert gradients are summed over it and divided by ``dp * cp``."""
    tokens: Group
    """The layer's ``dp * cp`` ranks (one batch): load-balancing statistics are summed over it."""


def new_expert_groups(token_rank_lists: Sequence[Sequence[int]], ep: int,
                      timeout: timedelta | None = None) -> ExpertGroups:
    """Create the EP, expert data-parallel and token groups; collective over the default group.

    ``token_rank_lists`` holds, for every tensor-parallel index (and pipeline stage) of the layer, its
    ``dp * cp`` ranks; every rank must call this with the same lists. Groups of one rank are ``None``.
    """
    ep_lists, edp_lists = [], []
    for ranks in token_rank_lists:
        ep_groups, edp_groups = expert_rank_grid(ranks, ep)
        ep_lists += ep_groups
        edp_lists += edp_groups
    return ExpertGroups(ep=_subgroup(ep_lists, timeout), expert_dp=_subgroup(edp_lists, timeout),
                        tokens=_subgroup([list(r) for r in token_rank_lists], timeout))


def _subgroup(rank_lists: list[list[int]], timeout: timedelta | None) -> Group:
    mine, _ = dist.new_subgroups_by_enumeration(rank_lists, timeout=timeout)
    return mine if mine is not None and mine.size() > 1 else None


# ------------------------------------------------------------------------------- communication
def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Group) -> torch.Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows; the backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int],  # type: ignore[override]
                group: Group) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        output_splits, input_splits = ctx.splits
        return _all_to_all(grad, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Group) -> torch.Tensor:
    """Send ``input_splits[i]`` rows of ``x`` to rank ``i``, receive ``output_splits[i]`` from it (differentiable)."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, output_splits, input_splits, group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; backward sums the gradients, so data-parallel gradient averaging of a loss that
    every rank computes from the summed value gives the single-process gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Differentiable sum of ``x`` over ``group``."""
    return x if group_size(group) == 1 else _AllReduceSum.apply(x, group)


class _CopyToTP(torch.autograd.Function):
    """Megatron's f: identity forward, all-reduce of the input gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's g: all-reduce of partial outputs forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Input of a column-parallel layer whose input is replicated over ``group``."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum of the partial outputs of a row-parallel layer over ``group``."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


# ------------------------------------------------------------------------------------------ routing
def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert accepts from ``num_tokens`` tokens (Switch Transformer eq. 3, times top-k)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def capacity_keep_mask(index: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int,
                       policy: DropPolicy = DropPolicy.PROBS) -> torch.Tensor:
    """Boolean (tokens, top_k) mask of the assignments kept when each expert takes at most ``capacity``.

    Within an expert, assignments are ranked by ``policy``: highest weight first (ties: earlier
    token, then earlier slot), or token order (token-major, slot-minor).
    """
    flat_expert = index.reshape(-1)
    n = flat_expert.numel()
    if DropPolicy(policy) is DropPolicy.PROBS:
        priority = torch.argsort(-weights.detach().reshape(-1).float(), stable=True)
    else:
        priority = torch.arange(n, device=index.device)
    by_expert = priority[torch.argsort(flat_expert[priority], stable=True)]
    counts = _bincount(flat_expert, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(n, device=index.device) - starts.repeat_interleave(counts, output_size=n)
    keep = torch.empty(n, dtype=torch.bool, device=index.device)
    keep[by_expert] = rank_in_expert < capacity
    return keep.view_as(index)


def group_by_local_expert(recv_counts: torch.Tensor, total: int) -> torch.Tensor:
    """The permutation that orders the ``total`` rows that arrived from a dispatch by local expert.

    ``recv_counts[s, j]``: rows from source rank ``s`` for local expert ``j``; they arrive grouped by
    source, then expert, and leave grouped by expert, then source.
    """
    local = torch.arange(recv_counts.shape[1], device=recv_counts.device).repeat(recv_counts.shape[0])
    expert_of_row = local.repeat_interleave(recv_counts.reshape(-1), output_size=total)
    return torch.argsort(expert_of_row, stable=True)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``x[perm][inv] == x``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def load_balancing_loss(logits: torch.Tensor, index: torch.Tensor, num_experts: int, group: Group) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4), ``E * sum_e f_e * P_e``, with the
    token fractions ``f`` and mean router probabilities ``P`` taken over the tokens of every rank of
    ``group``: on each rank the value of a single-process run over the whole batch."""
    probs = logits.float().softmax(dim=-1)
    routed = torch.zeros_like(probs).scatter_(1, index, 1.0).sum(0)
    count = torch.full((1,), probs.shape[0], dtype=probs.dtype, device=probs.device)
    stats = all_reduce_sum(torch.cat([probs.sum(0), routed, count]), group)
    prob_sum, routed, total = stats[:num_experts], stats[num_experts:-1], stats[-1]
    return num_experts * (routed * prob_sum).sum() / (total * total)


# -------------------------------------------------------------------------------- dispatch/combine
LocalExperts = Callable[[torch.Tensor, list[int]], torch.Tensor]
"""``run(rows, counts)``: rows grouped by local expert, ``counts[j]`` of them for expert ``j``; returns
one output row per input row."""


@dataclass(frozen=True)
class Routes:
    """Where this rank's kept (token, expert) assignments go, sorted by expert."""

    rows: torch.Tensor
    """Token of each assignment."""
    weights: torch.Tensor
    """Router weight of each assignment (differentiable)."""
    send_splits: list[int]
    """Assignments sent to each rank of the EP group."""
    recv_splits: list[int]
    """Assignments received from each rank of the EP group."""
    per_expert: list[int]
    """Received assignments per local expert."""
    perm: torch.Tensor | None
    """Orders the received assignments by local expert (see :func:`group_by_local_expert`); None when
    they arrive in that order (one rank)."""


def plan_routes(index: torch.Tensor, weights: torch.Tensor, num_experts: int, ep_group: Group,
                capacity_factor: float | None = None, drop_policy: DropPolicy = DropPolicy.PROBS) -> Routes:
    """Sort the assignments by expert, drop those past capacity, and exchange the per-expert counts over
    ``ep_group`` (one small all-to-all and the layer's one device-to-host sync)."""
    ep = group_size(ep_group)
    if num_experts % ep:
        raise PlanError("ep", f"{ep} does not divide the layer's {num_experts} experts")
    n, top_k = index.shape
    flat_expert, flat_weight = index.reshape(-1), weights.reshape(-1)
    flat_token = torch.arange(n, device=index.device).repeat_interleave(top_k)
    if capacity_factor is not None:
        capacity = expert_capacity(n, top_k, num_experts, capacity_factor)
        keep = capacity_keep_mask(index, weights, num_experts, capacity, drop_policy).reshape(-1)
        flat_expert, flat_weight, flat_token = flat_expert[keep], flat_weight[keep], flat_token[keep]
    order = torch.argsort(flat_expert, stable=True)
    send_counts = _bincount(flat_expert, num_experts)
    recv_counts = _exchange_counts(send_counts, ep, ep_group)
    counts = torch.cat([send_counts, recv_counts.reshape(-1)]).tolist()
    local = num_experts // ep
    sent, received = counts[:num_experts], counts[num_experts:]
    recv_splits = [sum(received[i * local : (i + 1) * local]) for i in range(ep)]
    return Routes(rows=flat_token[order], weights=flat_weight[order],
                  send_splits=[sum(sent[i * local : (i + 1) * local]) for i in range(ep)], recv_splits=recv_splits,
                  per_expert=[sum(received[j::local]) for j in range(local)],
                  perm=group_by_local_expert(recv_counts, sum(recv_splits)) if ep > 1 else None)


def routed_experts(tokens: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, run: LocalExperts, *,
                   num_experts: int, ep_group: Group, tp_group: Group = None, capacity_factor: float | None = None,
                   drop_policy: DropPolicy = DropPolicy.PROBS) -> torch.Tensor:
    """Routed-expert output ``sum_k weights[t, k] * expert_{index[t, k]}(tokens[t])`` for (tokens, hidden).

    The assignments are dispatched to the ranks of ``ep_group`` that hold their experts, run there by
    ``run``, combined back and summed per token. With ``tp_group`` (expert TP), ``run`` returns partial
    sums of row-parallel outputs and the reduction over ``tp_group`` happens once on the combined tokens,
    so it moves ``tokens x hidden`` rather than ``top_k`` times that. With ``capacity_factor``, each
    expert keeps at most :func:`expert_capacity` of this rank's assignments.
    """
    routes = plan_routes(index, weights, num_experts, ep_group, capacity_factor, drop_policy)
    sent = copy_to_tp(tokens, tp_group)[routes.rows]
    received = all_to_all(sent, routes.recv_splits, routes.send_splits, ep_group)
    if routes.perm is None:
        outputs = run(received, routes.per_expert)
    else:
        outputs = run(received[routes.perm], routes.per_expert)[inverse_permutation(routes.perm)]
    returned = all_to_all(outputs, routes.send_splits, routes.recv_splits, ep_group)
    weighted = (returned * copy_to_tp(routes.weights, tp_group)[:, None]).to(tokens.dtype)
    return reduce_from_tp(torch.zeros_like(tokens).index_add(0, routes.rows, weighted), tp_group)


def _bincount(values: torch.Tensor, bins: int) -> torch.Tensor:
    """``torch.bincount`` without its device-to-host sync (it reads the maximum)."""
    return torch.zeros(bins, dtype=torch.long, device=values.device).index_add_(0, values, torch.ones_like(values))


def _exchange_counts(send_counts: torch.Tensor, ep: int, group: Group) -> torch.Tensor:
    """(ep, experts/ep) rows this rank will receive from each source rank for each local expert."""
    if ep == 1:
        return send_counts.view(1, -1)
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv.view(ep, -1)
