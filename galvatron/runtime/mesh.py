"""Which rank does what: the rank grid of a plan, as pure functions and one live object.

A plan runs its ``pp`` device groups on consecutive rank ranges: device group ``i`` owns ranks
``[sum of the devices of groups < i, ...)``, and pipeline stage ``s`` runs on device group
``s % pp``. Inside a device group, each layer group lays its ``dp x cp x tp`` ranks out
row-major with ``tp`` innermost (the fastest links), so rank ``start + (d * cp + c) * tp + t``
has coordinate ``(d, c, t)``. Different layer groups of one stage may use different layouts
over the same ranks; the batch shard a rank holds is then always its ``dp`` coordinate
(``rank_in_group // (cp * tp)``), which is what makes activation re-layout a gather or a
split of the batch among a few ranks (:func:`batch_groups`).

The pure functions below are tested without processes; :class:`ParallelDims` turns them into
process groups and ``DeviceMesh`` objects for the live rank (torchtitan's ``ParallelDims``,
Megatron's ``HyperCommGrid``).
"""

from __future__ import annotations

import atexit
import enum
import gc
import math
import weakref
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from galvatron.errors import PlanError
from galvatron.plan import CPKind, LayerStrategy, Plan

if TYPE_CHECKING:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from galvatron.runtime.expert import FoldedRanks


class Axis(enum.StrEnum):
    """Names of the axes of a layer group's device mesh (outermost first)."""

    DP = "dp"
    CP = "cp"
    TP = "tp"


AXES = (Axis.DP, Axis.CP, Axis.TP)
RankGroup = tuple[int, ...]


# ------------------------------------------------------------------ pure rank maths
def device_group_ranks(plan: Plan) -> tuple[range, ...]:
    """Global ranks of each of the plan's ``pp`` device groups, in pipeline order."""
    out, start = [], 0
    for stage in plan.stages[: plan.pp]:
        out.append(range(start, start + stage.devices))
        start += stage.devices
    return tuple(out)


def device_group_of(plan: Plan, rank: int) -> int:
    """Index of the device group that holds ``rank``."""
    for i, ranks in enumerate(device_group_ranks(plan)):
        if rank in ranks:
            return i
    raise PlanError("stages", f"rank {rank} is outside the plan's {plan.world_size} devices")


def stages_of(plan: Plan, device_group: int) -> tuple[int, ...]:
    """Indices into ``plan.stages`` of the (virtual) stages a device group runs, in model order."""
    return tuple(range(device_group, len(plan.stages), plan.pp))


def pipeline_groups(plan: Plan) -> tuple[RankGroup, ...]:
    """Rank ``j`` of every device group forms pipeline group ``j``; needs equal device counts."""
    groups = device_group_ranks(plan)
    sizes = {len(r) for r in groups}
    if len(sizes) > 1:
        raise PlanError(
            "stages",
            f"pipeline stages on {', '.join(str(len(r)) for r in groups)} devices: the native runtime pairs "
            "rank j of each stage, so every stage needs the same device count",
        )
    return tuple(tuple(r[j] for r in groups) for j in range(len(groups[0])))


@dataclass(frozen=True)
class Layout:
    """A ``dp x cp x tp`` grid over the consecutive ranks of one device group."""

    ranks: range
    dp: int
    cp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        if self.dp * self.cp * self.tp != len(self.ranks):
            raise PlanError("dp", f"dp {self.dp} x cp {self.cp} x tp {self.tp} != {len(self.ranks)} devices")

    @classmethod
    def of(cls, strategy: LayerStrategy, ranks: range) -> Layout:
        return cls(ranks, strategy.dp, strategy.cp, strategy.tp)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.dp, self.cp, self.tp)

    def coordinate(self, rank: int) -> tuple[int, int, int]:
        """``(dp, cp, tp)`` coordinate of a global rank of this device group."""
        i = self.ranks.index(rank)
        return (i // (self.cp * self.tp), (i // self.tp) % self.cp, i % self.tp)

    def rank_at(self, d: int, c: int, t: int) -> int:
        return self.ranks[(d * self.cp + c) * self.tp + t]

    def axis_groups(self, axis: Axis | str) -> tuple[RankGroup, ...]:
        """Every group of ranks that differ only along ``axis``."""
        axis = Axis(axis)
        k = AXES.index(axis)
        others = [range(n) for j, n in enumerate(self.shape) if j != k]
        groups = []
        for a in others[0]:
            for b in others[1]:
                fixed = (a, b)
                coords = [(*fixed[:k], i, *fixed[k:]) for i in range(self.shape[k])]
                groups.append(tuple(self.rank_at(*c) for c in coords))
        return tuple(groups)

    def group_of(self, rank: int, axis: Axis | str) -> RankGroup:
        """The group along ``axis`` that contains ``rank``."""
        return next(g for g in self.axis_groups(axis) if rank in g)

    def data_groups(self) -> tuple[RankGroup, ...]:
        """Groups of ranks that hold different data of the same model shard (``dp x cp``):
        the gradient reduction groups."""
        groups = []
        for t in range(self.tp):
            groups.append(tuple(self.rank_at(d, c, t) for d in range(self.dp) for c in range(self.cp)))
        return tuple(groups)

    def batch_index(self, rank: int) -> int:
        """Which of the ``dp`` batch shards ``rank`` holds."""
        return self.coordinate(rank)[0]


def batch_groups(ranks: range, fine: int, coarse: int) -> tuple[RankGroup, ...]:
    """Groups that turn a batch split ``fine`` ways into one split ``coarse`` ways.

    Each group has ``fine // coarse`` ranks holding consecutive fine shards of one coarse
    shard, in shard order: an all-gather in a group goes fine -> coarse, a split goes back.
    """
    if fine % coarse or len(ranks) % fine:
        raise ValueError(f"cannot regroup a batch split {fine} ways into {coarse} over {len(ranks)} ranks")
    n = len(ranks)
    block, stride = n // coarse, n // fine
    groups = []
    for c in range(coarse):
        for offset in range(stride):
            base = c * block + offset
            groups.append(tuple(ranks[base + j * stride] for j in range(fine // coarse)))
    return tuple(groups)


def relayout_steps(dp_from: int, dp_to: int) -> tuple[tuple[str, int, int], ...]:
    """Collective steps that move a batch split ``dp_from`` ways to ``dp_to`` ways.

    Each step is ``("gather", fine, coarse)`` or ``("split", coarse, fine)``; through the
    greatest common divisor when neither degree divides the other; none when they are equal.
    """
    if dp_from == dp_to:
        return ()
    if dp_from % dp_to == 0:
        return (("gather", dp_from, dp_to),)
    if dp_to % dp_from == 0:
        return (("split", dp_from, dp_to),)
    g = math.gcd(dp_from, dp_to)
    return relayout_steps(dp_from, g) + relayout_steps(g, dp_to)


def data_layout(plan: Plan, device_group: int) -> Layout:
    """The layout of a stage's inputs, targets and outputs: the head's batch split and, under
    context parallelism, its sequence split (``cp``), replicated over the rest (what
    ``shard_batch`` and pipeline sends use)."""
    ranks = device_group_ranks(plan)[device_group]
    head = plan.head_strategy
    return Layout(ranks, head.dp, head.cp, len(ranks) // (head.dp * head.cp))


def device_group_strategies(plan: Plan, device_group: int) -> tuple[LayerStrategy, ...]:
    """Strategies used on a device group: its layer groups' (model order), then the edges'."""
    strategies = [g.strategy for s in stages_of(plan, device_group) for g in plan.stages[s].groups]
    if device_group == 0:
        strategies.append(plan.embedding_strategy)
    if device_group == (len(plan.stages) - 1) % plan.pp:
        strategies.append(plan.head_strategy)
    return tuple(strategies)


def plan_layouts(plan: Plan, device_group: int) -> tuple[Layout, ...]:
    """Distinct layouts used on a device group: its layer groups', the edges', the data layout."""
    ranks = device_group_ranks(plan)[device_group]
    layouts = {Layout.of(s, ranks) for s in device_group_strategies(plan, device_group)}
    layouts.add(data_layout(plan, device_group))
    return tuple(sorted(layouts, key=lambda lay: lay.shape))


def context_subgroups(strategy: LayerStrategy, ranks: range) -> tuple[RankGroup, ...]:
    """The Ulysses (inner) and ring (outer) groups of every cp group of a ``hybrid`` strategy
    (none for the other kinds)."""
    from galvatron.runtime.context import hybrid_rank_grid

    if strategy.cp == 1 or strategy.cp_kind is not CPKind.HYBRID:
        return ()
    out: list[RankGroup] = []
    for cp_ranks in Layout.of(strategy, ranks).axis_groups(Axis.CP):
        for lists in hybrid_rank_grid(cp_ranks, strategy.ulysses_degree):
            out += [tuple(g) for g in lists]
    return tuple(out)


def expert_groups(strategy: LayerStrategy, ranks: range) -> tuple[tuple[RankGroup, ...], tuple[RankGroup, ...]]:
    """(EP groups, expert data-parallel groups) of a MoE strategy: with ``etp`` 0 folded over each of
    its ``dp x cp`` data groups (:func:`galvatron.runtime.expert.expert_rank_grid`), otherwise in
    Megatron-Core's order over all its ranks (:func:`galvatron.runtime.expert.folded_rank_grid`);
    empty without an expert layout (``ep`` 1, ``etp`` 0)."""
    from galvatron.runtime.expert import expert_rank_grid

    if not has_expert_layout(strategy):
        return (), ()
    if strategy.etp:
        grid = _folded(strategy, ranks)
        return tuple(map(tuple, grid.ep)), tuple(map(tuple, grid.expert_dp))
    ep_groups: list[RankGroup] = []
    edp_groups: list[RankGroup] = []
    for data in Layout.of(strategy, ranks).data_groups():
        eps, edps = expert_rank_grid(data, strategy.ep)
        ep_groups += [tuple(g) for g in eps]
        edp_groups += [tuple(g) for g in edps]
    return tuple(ep_groups), tuple(edp_groups)


def has_expert_layout(strategy: LayerStrategy) -> bool:
    """Whether the strategy's MoE layers run expert-parallel (``ep > 1``) or folded (``etp`` set)."""
    return strategy.ep > 1 or bool(strategy.etp)


def folded_groups(strategy: LayerStrategy, ranks: range) -> tuple[tuple[RankGroup, ...], tuple[RankGroup, ...]]:
    """(ETP groups, sequence-chunk groups) of an ``etp`` strategy (empty for ``etp`` 0, whose expert
    TP is the tp axis)."""
    if not strategy.etp:
        return (), ()
    grid = _folded(strategy, ranks)
    return tuple(map(tuple, grid.etp)), tuple(map(tuple, grid.chunks))


def _folded(strategy: LayerStrategy, ranks: range) -> FoldedRanks:
    from galvatron.runtime.expert import folded_rank_grid

    return folded_rank_grid(ranks, strategy.tp, strategy.etp, strategy.ep)


def required_groups(plan: Plan) -> tuple[RankGroup, ...]:
    """Every process group the plan needs, over all device groups, in one deterministic order
    (every rank must create the same groups in the same order)."""
    groups: set[RankGroup] = set(pipeline_groups(plan)) if plan.pp > 1 else set()
    for dg, ranks in enumerate(device_group_ranks(plan)):
        layouts = plan_layouts(plan, dg)
        for lay in layouts:
            for axis in AXES:
                groups.update(lay.axis_groups(axis))
            groups.update(lay.data_groups())
        for s in device_group_strategies(plan, dg):
            groups.update(context_subgroups(s, ranks))
            ep_groups, edp_groups = expert_groups(s, ranks)
            groups.update(ep_groups)
            groups.update(g for lists in folded_groups(s, ranks) for g in lists)
            groups.update(g for g in edp_groups if len(g) == 1)  # larger ones: gradient groups
        degrees = {lay.dp for lay in layouts}
        for a in sorted(degrees):
            for b in sorted(degrees):
                for kind, x, y in relayout_steps(a, b):
                    fine, coarse = (x, y) if kind == "gather" else (y, x)
                    groups.update(batch_groups(ranks, fine, coarse))
    return tuple(sorted(groups, key=lambda g: (len(g), g)))


def gradient_groups(plan: Plan) -> tuple[RankGroup, ...]:
    """The gradient-reduction groups of the plan, in one order: the ``dp x cp`` groups of every
    layout and the expert data-parallel groups of ``ep > 1`` strategies."""
    groups = {g for dg in range(plan.pp) for lay in plan_layouts(plan, dg) for g in lay.data_groups() if len(g) > 1}
    for dg, ranks in enumerate(device_group_ranks(plan)):
        for s in device_group_strategies(plan, dg):
            groups.update(g for g in expert_groups(s, ranks)[1] if len(g) > 1)
    return tuple(sorted(groups, key=lambda g: (len(g), g)))


# ----------------------------------------------------------------- live process groups
_GROUPS: dict[tuple[str, RankGroup], dist.ProcessGroup | None] = {}
_WORLD: list[weakref.ref | None] = [None]
"""The default group the cached groups belong to, weakly: holding it would keep a destroyed gloo
group alive into the interpreter's finalization."""
_GRADIENTS = "gradients"
"""Gradient reductions get groups of their own: they launch asynchronously in an order that may
differ between ranks relative to the model's own collectives, which share the other groups."""


@atexit.register
def _release_groups() -> None:
    """Drop the cached groups (and collect what references them in cycles, e.g. a model's FSDP
    state) while the interpreter is still whole. A gloo group destroyed during finalization frees
    its worker threads' pending work there, which can abort the process (pytorch/pytorch#179291)."""
    _GROUPS.clear()
    _WORLD[0] = None
    gc.collect()


def _create_groups(groups: tuple[RankGroup, ...], timeout: timedelta, purpose: str = "") -> None:
    """Create (once per process) the process groups named; collective over the whole world."""
    import torch.distributed as dist

    world = _WORLD[0]() if _WORLD[0] is not None else None
    if world is None or world is not dist.group.WORLD:  # a new default group: old groups are gone
        _GROUPS.clear()
        _WORLD[0] = weakref.ref(dist.group.WORLD)
    me = dist.get_rank()
    for ranks in groups:
        if (purpose, ranks) not in _GROUPS:
            group = dist.new_group(list(ranks), timeout=timeout)
            _GROUPS[purpose, ranks] = group if me in ranks else None


class ParallelDims:
    """The live rank's view of a plan: its device group, its stages, and for each layer
    strategy a ``DeviceMesh`` with axes ``dp``, ``cp``, ``tp`` over the device group's ranks.

    Build with :meth:`build` on every rank (it creates every process group the plan needs,
    collectively); then hand out meshes and groups with :meth:`mesh` and :meth:`group`.
    """

    def __init__(self, plan: Plan, rank: int, device_type: str) -> None:
        self.plan = plan
        self.rank = rank
        self.device_type = device_type
        self.device_group = device_group_of(plan, rank)
        self.ranks = device_group_ranks(plan)[self.device_group]
        self.stages = stages_of(plan, self.device_group)
        self._meshes: dict[Layout, DeviceMesh] = {}

    @classmethod
    def build(cls, plan: Plan, rank: int, device_type: str, timeout: timedelta) -> ParallelDims:
        """Create every process group of ``plan`` (a collective over all ranks) and return the
        view of ``rank``."""
        dims = cls(plan, rank, device_type)
        _create_groups(required_groups(plan), timeout)
        _create_groups(gradient_groups(plan), timeout, _GRADIENTS)
        return dims

    @property
    def is_first(self) -> bool:
        """Whether this rank runs the embedding (the first pipeline stage)."""
        return 0 in self.stages

    def layout(self, strategy: LayerStrategy) -> Layout:
        return Layout.of(strategy, self.ranks)

    @property
    def data_layout(self) -> Layout:
        return data_layout(self.plan, self.device_group)

    def group(self, ranks: RankGroup, purpose: str = "") -> dist.ProcessGroup:
        """The process group over ``ranks`` (which must include this rank)."""
        group = _GROUPS.get((purpose, tuple(ranks)))
        if group is None:
            raise KeyError(f"no process group over ranks {ranks} for rank {self.rank}")
        return group

    def mesh(self, strategy: LayerStrategy | Layout) -> DeviceMesh:
        """The ``(dp, cp, tp)`` device mesh of a layer strategy on this rank's device group."""
        from torch.distributed.device_mesh import DeviceMesh

        lay = strategy if isinstance(strategy, Layout) else self.layout(strategy)
        if lay not in self._meshes:
            import torch

            grid = torch.tensor(list(lay.ranks), dtype=torch.int).view(*lay.shape)
            groups = [self.group(lay.group_of(self.rank, axis)) for axis in AXES]
            self._meshes[lay] = DeviceMesh.from_group(
                groups, self.device_type, mesh=grid, mesh_dim_names=tuple(a.value for a in AXES)
            )
        return self._meshes[lay]

    def data_mesh(self, strategy: LayerStrategy | Layout) -> DeviceMesh:
        """The 1-D mesh FSDP2 shards a layer group over: its ``dp`` axis, or with ``cp > 1`` the
        ``dp x cp`` ranks (a flattened axis of the same rank grid, so TP DTensors compose)."""
        from torch.distributed.device_mesh import DeviceMesh

        lay = strategy if isinstance(strategy, Layout) else self.layout(strategy)
        if lay.cp == 1:
            return self.mesh(lay)["dp"]
        import torch

        grid = torch.tensor(list(lay.ranks), dtype=torch.int).view(lay.dp * lay.cp, lay.tp)
        data = next(g for g in lay.data_groups() if self.rank in g)
        groups = [self.group(data), self.group(lay.group_of(self.rank, Axis.TP))]
        return DeviceMesh.from_group(groups, self.device_type, mesh=grid, mesh_dim_names=("dp_cp", "tp"))["dp_cp"]

    def context_ranks(self, strategy: LayerStrategy) -> tuple[RankGroup, RankGroup | None, RankGroup | None]:
        """This rank's (cp, Ulysses, ring) rank groups of a ``cp > 1`` strategy (the last two for
        ``hybrid`` only)."""
        cp = self.layout(strategy).group_of(self.rank, Axis.CP)
        subgroups = [g for g in context_subgroups(strategy, self.ranks) if self.rank in g]
        return (cp, *subgroups) if subgroups else (cp, None, None)

    def expert_ranks(self, strategy: LayerStrategy) -> tuple[RankGroup, RankGroup]:
        """This rank's (EP, expert data-parallel) rank groups of a strategy (``ep`` 1: itself
        and its ``dp x cp`` data group)."""
        if not has_expert_layout(strategy):
            return (self.rank,), next(g for g in self.layout(strategy).data_groups() if self.rank in g)
        ep_groups, edp_groups = expert_groups(strategy, self.ranks)
        return next(g for g in ep_groups if self.rank in g), next(g for g in edp_groups if self.rank in g)

    def expert_tp_ranks(self, strategy: LayerStrategy) -> tuple[RankGroup, RankGroup]:
        """This rank's (expert TP, sequence-chunk) rank groups of a MoE strategy: its tp group and
        itself with ``etp`` 0; its ETP group and the tp ranks of its ETP index otherwise."""
        if not strategy.etp:
            return self.layout(strategy).group_of(self.rank, Axis.TP), (self.rank,)
        etp_groups, chunk_groups = folded_groups(strategy, self.ranks)
        return next(g for g in etp_groups if self.rank in g), next(g for g in chunk_groups if self.rank in g)

    def gradient_group(self, ranks: RankGroup) -> dist.ProcessGroup:
        """The gradient-reduction group over ``ranks`` (its own process group when it has several
        ranks; see ``_GRADIENTS``)."""
        return self.group(ranks, _GRADIENTS if len(ranks) > 1 else "")

    def data_group(self, strategy: LayerStrategy | Layout) -> dist.ProcessGroup:
        """Gradient-reduction group (``dp x cp`` ranks holding the same parameter shard), used
        for nothing else."""
        lay = strategy if isinstance(strategy, Layout) else self.layout(strategy)
        return self.gradient_group(next(g for g in lay.data_groups() if self.rank in g))

    def pipeline_group(self) -> dist.ProcessGroup:
        """The group of ranks at this rank's position in every pipeline stage."""
        return self.group(next(g for g in pipeline_groups(self.plan) if self.rank in g))
