"""The space the search covers, and the options that restrict it.

Claimed space (the search is exact over it with respect to :func:`strategies.cost.cost_plan`):
- pipeline degree ``pp`` (a divisor of the world size), every device group of ``world / pp`` devices;
- schedules 1F1B and zero-bubble (ZB-H1) with any contiguous split of the blocks over the ``pp``
  stages, each stage with its own strategy; interleaved 1F1B with ``v`` chunks per group and one
  strategy for the whole model, the blocks split evenly over the chunks (where the chunks do not
  divide the blocks, the extra blocks on the first chunks or on the last) or over all chunks but the
  first and the last, which hold the embedding, and the norm and head, alone (Llama 3's layout), or
  with the embedding and the head counted as a block each (Megatron-Core's accounting):
  :func:`interleaved_splits`;
- a stage strategy: tp, Megatron SP, cp degree and kind (Ulysses, ring, striped, hybrid with any
  Ulysses degree), ep and expert TP (MoE blocks: ``etp`` 0, i.e. the layer's tp, or 1 with SP when
  tp > 1, MoE Parallel Folding; another divisor of tp when pinned), ZeRO stage, optimizer offload;
  recomputation per block: the stage's first ``k`` blocks fully recomputed and the rest at one
  lower level (none or selective; none under zero bubble), any ``k`` (Megatron's
  ``--recompute-num-layers``);
- the number of micro-batches (any divisor of the global batch) at a fixed global batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from galvatron.errors import ConfigError
from galvatron.plan import CPKind, DType, LayerStrategy, Recompute, Schedule, even_split
from galvatron.spec import ModelSpec

ALL_CAPABILITIES = frozenset({
    "pp", "tp", "sp", "cp:ulysses", "cp:ring", "cp:striped", "cp:hybrid", "ep", "etp", "zero1", "zero2", "zero3",
    "offload", "recompute:selective", "recompute:full", "schedule:1f1b", "schedule:interleaved-1f1b",
    "schedule:zero-bubble",
})


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """Restrictions of the search space; the defaults search everything the backend supports."""

    global_batch: int | None = None
    """Samples per step; None: about 4M tokens (Llama 2/3 pre-training), at least one per device."""
    micro_batch_counts: tuple[int, ...] | None = None
    """Allowed numbers of micro-batches; None: every divisor of the global batch."""
    max_tp: int | None = None
    """Largest TP degree; None: GPUs per node."""
    max_pp: int | None = None
    max_cp: int = 16
    max_ep: int | None = None
    max_vpp: int = 4
    uniform: bool = False
    """One strategy for every layer and an even split (what Megatron/torchtitan configs express)."""
    cp_kinds: tuple[CPKind, ...] = tuple(CPKind)
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    recompute: tuple[Recompute, ...] = tuple(Recompute)
    schedules: tuple[Schedule, ...] = (Schedule.ONE_F_ONE_B, Schedule.INTERLEAVED_1F1B, Schedule.ZERO_BUBBLE)
    dtype: DType = DType.BF16
    capabilities: frozenset[str] = ALL_CAPABILITIES
    """What the runtime backend can run (e.g. no ``cp:hybrid`` or ``zero-bubble`` on an old stack)."""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    """Pinned values: strategy fields (``tp``, ``sp``, ``cp``, ``cp_kind``, ``dp``, ``zero``, ...) and
    ``pp``, ``vpp``, ``num_micro_batches``."""
    top_k: int = 1
    progress: Callable[[str], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.fixed) - _FIXABLE)
        if unknown:
            raise ConfigError(f"cannot pin {unknown[0]!r} (pinnable: {', '.join(sorted(_FIXABLE))})")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {self.top_k}")
        # the enum fields take their values' names too ("1f1b", "full", "ring", "bf16")
        for name, kind in (("cp_kinds", CPKind), ("recompute", Recompute), ("schedules", Schedule)):
            object.__setattr__(self, name, tuple(_member(kind, v, name) for v in getattr(self, name)))
        object.__setattr__(self, "dtype", _member(DType, self.dtype, "dtype"))

    def can(self, feature: str) -> bool:
        return feature in self.capabilities


_FIXABLE = {f.name for f in dataclasses.fields(LayerStrategy)} | {"pp", "vpp", "num_micro_batches"}


def _member(kind: Any, value: Any, field_name: str) -> Any:
    """``value`` as a member of the enum ``kind`` (members and their string values accepted)."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ConfigError(f"SearchOptions.{field_name}: {value!r} is not one of {choices}") from None


def default_global_batch(spec: ModelSpec, world: int) -> int:
    """About 4M tokens per step, a power of two samples, at least one sample per device."""
    samples = max(1, (4 * 2**20) // spec.seq_len)
    power = 1 << (samples.bit_length() - 1)
    return max(power, 1 << (world - 1).bit_length())


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def pp_candidates(spec: ModelSpec, world: int, options: SearchOptions) -> list[int]:
    """Pipeline degrees: divisors of the world size up to the block count (and ``max_pp``)."""
    if "pp" in options.fixed:
        return [int(options.fixed["pp"])]
    limit = min(spec.num_blocks, options.max_pp or world)
    return [p for p in divisors(world) if p <= limit and (p == 1 or options.can("pp"))]


def micro_batch_counts(global_batch: int, pp: int, options: SearchOptions) -> list[int]:
    """Micro-batch counts to try: divisors of the global batch (pinned or listed ones only)."""
    if "num_micro_batches" in options.fixed:
        return [int(options.fixed["num_micro_batches"])]
    allowed = divisors(global_batch)
    if options.micro_batch_counts is not None:
        allowed = [m for m in allowed if m in options.micro_batch_counts]
    return allowed


def interleaved_splits(blocks: int, chunks: int, uniform: bool = False) -> list[list[int]]:
    """Block counts per chunk the search tries for an interleaved schedule of ``chunks`` chunks: an
    even split with its extra blocks first, and last; the same over the inner chunks with the first
    and the last chunk empty (the embedding, and the norm and head, alone); and, where ``blocks + 2``
    chunks' worth divide evenly, the embedding and the head counted as a block each (``k - 1, k, ...,
    k, k - 1``: Megatron-Core's ``account_for_embedding_in_pipeline_split`` and
    ``account_for_loss_in_pipeline_split``, Llama 3's one block fewer on the first and last stage).
    Each once, those that give every other chunk at least one block. ``uniform``
    (``SearchOptions.uniform``, backends that split evenly): the even split alone."""
    out: list[list[int]] = []
    for inner, edges in ((chunks, False), (chunks - 2, True))[:1 if uniform else 2]:
        if inner < 1 or blocks < inner:
            continue
        counts = even_split(blocks, inner)
        for split in (counts, counts[::-1])[:1 if uniform else 2]:
            split = [0, *split, 0] if edges else split
            if split not in out:
                out.append(split)
    accounted = None if uniform else accounted_split(blocks, chunks)
    if accounted is not None and accounted not in out:
        out.append(accounted)
    return out


def accounted_split(blocks: int, chunks: int) -> list[int] | None:
    """Megatron-Core's split with the embedding and the head counted as a block each
    (``account_for_embedding_in_pipeline_split``, ``account_for_loss_in_pipeline_split``): ``k - 1,
    k, ..., k, k - 1`` blocks over ``chunks`` chunks, or None where ``blocks + 2`` does not divide
    evenly into chunks of at least two."""
    per, rest = divmod(blocks + 2, chunks)
    if rest or per < 2 or chunks < 2:
        return None
    return [per - 1, *[per] * (chunks - 2), per - 1]


def strategies(spec: ModelSpec, devices: int, gpus_per_node: int, options: SearchOptions) -> list[LayerStrategy]:
    """Every stage strategy on ``devices`` devices the model and options allow (recompute left NONE:
    the search chooses it per block)."""
    return [s for s in _all_strategies(spec, devices, gpus_per_node, options) if _pinned_ok(s, options.fixed)]


def _pinned_ok(s: LayerStrategy, fixed: Mapping[str, Any]) -> bool:
    for name, value in fixed.items():
        if name in ("pp", "vpp", "num_micro_batches", "recompute"):
            continue
        if name == "etp" and value:  # a pinned degree equal to tp is stored as etp 0
            if s.expert_tp != value:
                return False
            continue
        if _plain(getattr(s, name)) != _plain(value):
            return False
    return True


def _plain(value: Any) -> Any:
    return value.value if hasattr(value, "value") else value


def _all_strategies(spec: ModelSpec, devices: int, gpn: int, options: SearchOptions) -> Iterator[LayerStrategy]:
    heads = [b.heads for b in spec.blocks if b.heads] or [0]
    kv = [b.kv_heads for b in spec.blocks if b.heads] or [0]
    experts = [b.experts for b in spec.blocks if b.experts]
    max_tp = options.max_tp or gpn
    for tp in divisors(devices):
        if tp > max_tp or (tp > 1 and not options.can("tp")) or any(h % tp for h in heads + kv if h):
            continue
        for cp, kind, u in _cp_choices(spec, devices // tp, tp, heads, options):
            dp = devices // (tp * cp)
            for etp in _etp_choices(tp, experts, options):
                for ep in _ep_choices(devices // (etp or tp), experts, options):
                    base = LayerStrategy(dp=dp, tp=tp, cp=cp, cp_kind=kind, cp_ulysses=u, ep=ep, etp=etp)
                    yield from _zero_variants(base, spec, options)


def _cp_choices(spec: ModelSpec, rest: int, tp: int, heads: list[int], options: SearchOptions
                ) -> Iterator[tuple[int, CPKind, int]]:
    yield 1, CPKind.ULYSSES, 0
    for cp in divisors(rest)[1:]:
        if cp > options.max_cp or spec.seq_len % cp:
            continue
        local_heads = [h // tp for h in heads if h]
        for kind in options.cp_kinds:
            if not options.can(f"cp:{kind.value}"):
                continue
            if kind is CPKind.ULYSSES and any(h % cp for h in local_heads):
                continue
            if kind is CPKind.HYBRID:
                for u in divisors(cp)[1:-1]:
                    if not any(h % u for h in local_heads):
                        yield cp, kind, u
                continue
            yield cp, kind, 0


def _ep_choices(ranks: int, experts: list[int], options: SearchOptions) -> list[int]:
    if not experts or not options.can("ep"):
        return [1]
    limit = options.max_ep or ranks
    return [e for e in divisors(ranks) if e <= limit and not any(x % e for x in experts)]


def _etp_choices(tp: int, experts: list[int], options: SearchOptions) -> list[int]:
    """Expert TP degrees: 0 (the layer's tp) and, for MoE models with EP allowed and ``tp > 1``, 1
    (whole experts: MoE Parallel Folding's ETP 1, Megatron-Core ``--expert-tensor-parallel-size 1``);
    a pinned degree that divides ``tp`` is tried too. Other degrees stay out to keep MoE searches
    short (each doubles the MoE strategies at that tp)."""
    if not experts or tp == 1 or not (options.can("ep") and options.can("etp")):
        return [0]
    pinned = options.fixed.get("etp")
    extra = [pinned] if isinstance(pinned, int) and 1 < pinned < tp and tp % pinned == 0 else []
    return [0, 1, *extra]


def _zero_variants(base: LayerStrategy, spec: ModelSpec, options: SearchOptions) -> Iterator[LayerStrategy]:
    sps = [False, True] if base.tp > 1 and options.can("sp") and spec.seq_len % (base.tp * base.cp) == 0 else [False]
    if base.etp and base.tp > 1:
        sps = [sp for sp in sps if sp]  # folding over TP ranks needs distinct tokens on them
    replicas = base.dp * base.cp
    stages = [z for z in options.zero_stages if z == 0 or (replicas > 1 and options.can(f"zero{z}"))]
    for sp in sps:
        for z in stages:
            yield dataclasses.replace(base, sp=sp, zero=z)
            if z >= 1 and options.can("offload"):
                yield dataclasses.replace(base, sp=sp, zero=z, offload=True)


def recompute_modes(options: SearchOptions, schedule: Schedule | None = None) -> tuple[list[Recompute], bool]:
    """The lower recompute levels a stage may use for its non-fully-recomputed blocks, and whether
    full recomputation of a stage's first blocks is allowed, under ``schedule``. Zero bubble takes
    no recomputation: its split backward (``torch.distributed.pipelining``) runs one backward pass
    for the input gradients and one per group of weights, a checkpointed block recomputes its forward
    in each, and selective checkpointing refuses the second."""
    fixed = options.fixed.get("recompute")
    allowed = [Recompute(fixed)] if fixed is not None else list(options.recompute)
    allowed = [r for r in allowed if r is Recompute.NONE or options.can(f"recompute:{r.value}")]
    if schedule is Schedule.ZERO_BUBBLE:
        allowed = [r for r in allowed if r is Recompute.NONE]
    lower = [r for r in allowed if r is not Recompute.FULL]
    return lower, Recompute.FULL in allowed
