"""The plan: the one contract between the search, the runtime and the user.

A :class:`Plan` says how every layer of a model is parallelised. The search writes it, the
runtime reads it once, users read and edit it as YAML. Layer indices count the model's
repeated blocks (``ModelSpec.blocks``), ``0 .. num_blocks-1``; the embedding runs on the first
pipeline stage and the final norm and head on the last, with strategies of their own.

Pipeline stages are listed in model order. With ``virtual_stages = v`` there are ``pp * v``
stages and stage ``i`` runs on device group ``i % pp`` (the interleaved layout of
Narayanan et al. SC'21), so ``pp = len(stages) // v``.

The dict/YAML form is compact: a plan-wide default ``strategy``, and per stage either a layer
range ``[start, end]`` that uses it, or a list of ``{range: [start, end], <overrides>}``.
``dp`` may be left out anywhere: it is then ``devices // (tp * cp)``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from galvatron.errors import PlanError

if TYPE_CHECKING:
    from galvatron.spec import ModelSpec

SCHEMA_VERSION = 1


class CPKind(enum.StrEnum):
    """How attention is computed when the sequence is split over ``cp`` ranks."""

    ULYSSES = "ulysses"  # all-to-all sequence <-> heads (DeepSpeed-Ulysses, Jacobs et al. 2023)
    RING = "ring"  # K/V rotation over p2p, contiguous chunks (Liu et al. 2023)
    STRIPED = "striped"  # ring with token i on rank i mod cp (Brandon et al. 2023)
    HYBRID = "hybrid"  # Ulysses inside x ring across (USP, Fang & Zhao 2024)


class Recompute(enum.StrEnum):
    """Activation recomputation of a layer: none, attention core only, or the whole layer."""

    NONE = "none"
    SELECTIVE = "selective"
    FULL = "full"


class Schedule(enum.StrEnum):
    """Pipeline schedule (``torch.distributed.pipelining`` names in brackets)."""

    GPIPE = "gpipe"  # ScheduleGPipe
    ONE_F_ONE_B = "1f1b"  # Schedule1F1B
    INTERLEAVED_1F1B = "interleaved-1f1b"  # ScheduleInterleaved1F1B
    ZERO_BUBBLE = "zero-bubble"  # ScheduleInterleavedZeroBubble


class DType(enum.StrEnum):
    """Compute dtype of the plan (parameters kept in fp32 master copies unless fp32)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"

    @property
    def bytes(self) -> int:
        return {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}[self.value]


def _enum(cls: type[enum.Enum], value: Any, path: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(m.value for m in cls)  # type: ignore[attr-defined]
        raise PlanError(path, f"{value!r} is not one of {allowed}") from None


def _positive_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(path, f"{value!r} is not a positive integer")
    return value


@dataclass(frozen=True, kw_only=True)
class LayerStrategy:
    """How one layer (or a range of layers) is parallelised over the devices of its stage."""

    dp: int = 1
    """Data-parallel degree: the micro-batch is split over ``dp`` replicas."""
    tp: int = 1
    """Tensor-parallel degree (Megatron column/row split of attention heads and MLP)."""
    sp: bool = False
    """Megatron sequence parallelism for norms/dropout inside the TP group (needs tp > 1)."""
    cp: int = 1
    """Context-parallel degree: the sequence is split over ``cp`` ranks."""
    cp_kind: CPKind = CPKind.ULYSSES
    """Attention algorithm when ``cp > 1``."""
    cp_ulysses: int = 0
    """For ``cp_kind: hybrid``: the Ulysses degree (inner); the ring degree is ``cp // cp_ulysses``."""
    ep: int = 1
    """Expert-parallel degree for MoE layers. With ``etp`` 0 it folds over the layer's ``dp * cp``
    ranks (``tp`` apart); otherwise over ranks ``etp`` apart (see ``etp``)."""
    etp: int = 0
    """Expert tensor-parallel degree of MoE layers; 0 (and a value equal to ``tp``, stored as 0): the
    routed experts are split by the layer's ``tp``. Otherwise MoE Parallel Folding (Liu et al. 2025,
    Megatron-Core ``--expert-tensor-parallel-size``): the MoE part re-partitions the layer's
    ``dp * tp * cp`` ranks as ``etp`` (innermost, adjacent ranks) x ``ep`` (``etp`` apart) x expert
    data parallelism (``etp * ep`` apart), and each rank routes its own sequence-parallel shard of
    the tokens (needs ``sp`` when ``tp > 1``)."""
    zero: int = 0
    """ZeRO stage 0-3 over the data-parallel ranks (0 = DDP, 1 = optimizer states sharded,
    2 = + gradients, 3 = + parameters)."""
    recompute: Recompute = Recompute.NONE
    """Activation recomputation."""
    offload: bool = False
    """Offload sharded optimizer states (and with ZeRO-3 parameters) to CPU memory."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "cp", "ep"):
            _positive_int(getattr(self, name), name)
        if isinstance(self.etp, bool) or not isinstance(self.etp, int) or self.etp < 0:
            raise PlanError("etp", f"{self.etp!r} is not a non-negative integer")
        if self.etp == self.tp:
            object.__setattr__(self, "etp", 0)  # one spelling per strategy: "the same as tp"
        object.__setattr__(self, "cp_kind", _enum(CPKind, self.cp_kind, "cp_kind"))
        object.__setattr__(self, "recompute", _enum(Recompute, self.recompute, "recompute"))
        if self.zero not in (0, 1, 2, 3) or isinstance(self.zero, bool):
            raise PlanError("zero", f"{self.zero!r} is not one of 0, 1, 2, 3")
        if not isinstance(self.cp_ulysses, int) or self.cp_ulysses < 0:
            raise PlanError("cp_ulysses", f"{self.cp_ulysses!r} is not a non-negative integer")

    @property
    def weight_layout(self) -> tuple[int, int, int, bool]:
        """(dp, tp, zero, offload): what decides how a weight, its gradient and its optimizer
        states are split over the ranks. Tied input and output embeddings need one layout at both
        ends (on one stage they are one parameter; across pipeline stages the two copies' gradient
        shards are added rank by rank)."""
        return self.dp, self.tp, self.zero, self.offload

    @property
    def devices(self) -> int:
        """Devices one copy of the layer occupies: ``dp * tp * cp``."""
        return self.dp * self.tp * self.cp

    @property
    def expert_tp(self) -> int:
        """The degree that splits each routed expert: ``etp``, or ``tp`` when ``etp`` is 0."""
        return self.etp or self.tp

    @property
    def ring_degree(self) -> int:
        """Ranks that exchange K/V over p2p (1 for Ulysses)."""
        if self.cp_kind is CPKind.ULYSSES:
            return 1
        if self.cp_kind is CPKind.HYBRID:
            return self.cp // max(self.cp_ulysses, 1)
        return self.cp

    @property
    def ulysses_degree(self) -> int:
        """Ranks that exchange sequence for heads over all-to-all (1 for ring/striped)."""
        if self.cp_kind is CPKind.ULYSSES:
            return self.cp
        if self.cp_kind is CPKind.HYBRID:
            return max(self.cp_ulysses, 1)
        return 1

    def to_dict(self, base: LayerStrategy | None = None) -> dict[str, Any]:
        """Fields that differ from ``base`` (all fields when ``base`` is None), as plain YAML types."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if base is not None and value == getattr(base, f.name):
                continue
            out[f.name] = value.value if isinstance(value, enum.Enum) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str, devices: int | None = None) -> LayerStrategy:
        """Build from a mapping; ``dp`` is derived from ``devices`` when it is left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"{path}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(known))})")
        values = dict(data)
        if "dp" not in values and devices is not None:
            tp, cp = values.get("tp", 1), values.get("cp", 1)
            if isinstance(tp, int) and isinstance(cp, int) and tp > 0 and cp > 0 and devices % (tp * cp) == 0:
                values["dp"] = devices // (tp * cp)
        try:
            return cls(**values)
        except PlanError as err:
            raise PlanError(f"{path}.{err.path}", err.problem) from None
        except TypeError as err:
            raise PlanError(path, str(err)) from None


@dataclass(frozen=True, kw_only=True)
class LayerGroup:
    """A half-open range of blocks ``[start, end)`` that share one strategy."""

    start: int
    end: int
    strategy: LayerStrategy

    @property
    def num_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One pipeline stage: consecutive layer groups on ``devices`` devices."""

    devices: int
    groups: tuple[LayerGroup, ...]

    @property
    def start(self) -> int:
        return self.groups[0].start

    @property
    def end(self) -> int:
        return self.groups[-1].end


@dataclass(frozen=True, kw_only=True)
class Pipeline:
    """Pipeline schedule and the number of model chunks per device group."""

    schedule: Schedule = Schedule.ONE_F_ONE_B
    virtual_stages: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", _enum(Schedule, self.schedule, "pipeline.schedule"))
        _positive_int(self.virtual_stages, "pipeline.virtual_stages")


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A complete parallelisation plan. Build with :meth:`uniform`, :meth:`from_dict` or
    :meth:`load`; check against a world size and model with :meth:`validate`."""

    stages: tuple[Stage, ...]
    global_batch_size: int
    """Samples per optimizer step, over all data-parallel replicas."""
    num_micro_batches: int = 1
    """Pipeline micro-batches (gradient-accumulation steps without a pipeline) per step."""
    pipeline: Pipeline = field(default_factory=Pipeline)
    embedding: LayerStrategy | None = None
    """Embedding strategy on the first stage (tp > 1 = vocabulary parallel); None: as block 0."""
    head: LayerStrategy | None = None
    """Final norm and LM-head strategy on the last stage (tp > 1 = vocabulary-parallel loss);
    None: as the last block."""
    dtype: DType = DType.BF16
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _enum(DType, self.dtype, "dtype"))
        _positive_int(self.global_batch_size, "global_batch_size")
        _positive_int(self.num_micro_batches, "num_micro_batches")
        if not self.stages:
            raise PlanError("stages", "a plan needs at least one stage")

    # ----------------------------------------------------------------- derived
    @property
    def pp(self) -> int:
        """Pipeline-parallel degree (device groups), ``len(stages) // virtual_stages``."""
        return max(len(self.stages) // self.pipeline.virtual_stages, 1)

    @property
    def world_size(self) -> int:
        """Devices the plan needs: the sum over the ``pp`` device groups."""
        return sum(stage.devices for stage in self.stages[: self.pp])

    @property
    def num_layers(self) -> int:
        return self.stages[-1].end

    @property
    def micro_batch_size(self) -> int:
        """Samples in one micro-batch over all data-parallel replicas."""
        return self.global_batch_size // self.num_micro_batches

    @property
    def is_uniform(self) -> bool:
        """True when every layer, the embedding and the head use one strategy."""
        return len({g.strategy for g in self.groups()} | {self.embedding_strategy, self.head_strategy}) == 1

    @property
    def embedding_strategy(self) -> LayerStrategy:
        return self.embedding or self.stages[0].groups[0].strategy

    @property
    def head_strategy(self) -> LayerStrategy:
        return self.head or self.stages[-1].groups[-1].strategy

    def groups(self) -> list[LayerGroup]:
        """All layer groups in model order."""
        return [g for stage in self.stages for g in stage.groups]

    def strategy_of(self, layer: int) -> LayerStrategy:
        """Strategy of block ``layer``."""
        for g in self.groups():
            if g.start <= layer < g.end:
                return g.strategy
        raise IndexError(f"layer {layer} is not in the plan (0..{self.num_layers - 1})")

    def stage_of(self, layer: int) -> int:
        """Index into ``stages`` of the stage that holds block ``layer``."""
        for i, stage in enumerate(self.stages):
            if stage.start <= layer < stage.end:
                return i
        raise IndexError(f"layer {layer} is not in the plan (0..{self.num_layers - 1})")

    # -------------------------------------------------------------- builders
    @classmethod
    def uniform(
        cls,
        num_layers: int,
        *,
        global_batch_size: int,
        num_micro_batches: int = 1,
        pp: int = 1,
        schedule: Schedule | str = Schedule.ONE_F_ONE_B,
        virtual_stages: int = 1,
        dtype: DType | str = DType.BF16,
        layer_split: Sequence[int] | None = None,
        **strategy: Any,
    ) -> Plan:
        """A plan with one strategy everywhere (``dp``, ``tp``, ``cp``, ... as keywords) and
        ``pp * virtual_stages`` stages, split evenly unless ``layer_split`` gives layer counts."""
        strat = LayerStrategy(**strategy)
        chunks = pp * virtual_stages
        counts = list(layer_split) if layer_split is not None else even_split(num_layers, chunks)
        if len(counts) != chunks or sum(counts) != num_layers:
            raise PlanError("stages", f"layer split {counts} does not give {chunks} stages of {num_layers} layers")
        stages, start = [], 0
        for n in counts:
            group = LayerGroup(start=start, end=start + n, strategy=strat)
            stages.append(Stage(devices=strat.devices, groups=(group,)))
            start += n
        return cls(
            stages=tuple(stages),
            global_batch_size=global_batch_size,
            num_micro_batches=num_micro_batches,
            pipeline=Pipeline(schedule=schedule, virtual_stages=virtual_stages),
            dtype=dtype,
        )

    # ------------------------------------------------------------ validation
    def validate(self, world_size: int | None = None, model_spec: ModelSpec | None = None) -> Plan:
        """Check the plan against itself, a world size and a model; raise :class:`PlanError`
        naming the first bad field. Returns the plan so calls can chain."""
        from galvatron.validate import validate_plan

        validate_plan(self, world_size, model_spec)
        return self

    # --------------------------------------------------------- serialisation
    def default_strategy(self) -> LayerStrategy:
        """The most common layer strategy (by layer count): the compact form's default."""
        counts: dict[LayerStrategy, int] = {}
        for g in self.groups():
            counts[g.strategy] = counts.get(g.strategy, 0) + g.num_layers
        return max(counts, key=counts.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        """Compact, YAML-ready dict; ``Plan.from_dict(p.to_dict()) == p``."""
        default = self.default_strategy()
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "global_batch_size": self.global_batch_size,
            "num_micro_batches": self.num_micro_batches,
            "dtype": self.dtype.value,
            "pipeline": {"schedule": self.pipeline.schedule.value, "virtual_stages": self.pipeline.virtual_stages},
            "strategy": _override_dict(default, None, default.devices),
            "stages": [_stage_dict(s, default) for s in self.stages],
        }
        for name, stage in (("embedding", self.stages[0]), ("head", self.stages[-1])):
            value = getattr(self, name)
            if value is not None:
                out[name] = _override_dict(value, default, stage.devices)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Parse the dict/YAML form (compact or fully expanded)."""
        return _plan_from_dict(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str) -> Plan:
        import yaml

        data = yaml.safe_load(text)
        if not isinstance(data, Mapping):
            raise PlanError("", "a plan file must hold a mapping")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_yaml(Path(path).read_text())

    def describe(self) -> str:
        """A short human-readable summary, one line per layer group."""
        lines = [
            f"plan: {len(self.stages)} stage(s), pp={self.pp} x vpp={self.pipeline.virtual_stages} "
            f"({self.pipeline.schedule.value}), {self.world_size} devices, global batch {self.global_batch_size} "
            f"in {self.num_micro_batches} micro-batch(es), {self.dtype.value}"
        ]
        for i, stage in enumerate(self.stages):
            for g in stage.groups:
                where = f"  stage {i} layers [{g.start}:{g.end}) on {stage.devices}"
                alone = "" if g.end > g.start else " (the embedding alone)" if i == 0 else " (the norm and head alone)"
                lines.append(f"{where}{alone}: {format_strategy(g.strategy)}")
        return "\n".join(lines)


def format_strategy(s: LayerStrategy) -> str:
    """``dp4 tp2+sp cp2(ring) ep4 etp1 zero1 recompute=full`` style summary of a strategy."""
    parts = [f"dp{s.dp}", f"tp{s.tp}" + ("+sp" if s.sp else "")]
    if s.cp > 1:
        kind = s.cp_kind.value + (f" u{s.ulysses_degree}xr{s.ring_degree}" if s.cp_kind is CPKind.HYBRID else "")
        parts.append(f"cp{s.cp}({kind})")
    if s.ep > 1:
        parts.append(f"ep{s.ep}")
    if s.etp:
        parts.append(f"etp{s.etp}")
    parts.append(f"zero{s.zero}")
    if s.recompute is not Recompute.NONE:
        parts.append(f"recompute={s.recompute.value}")
    if s.offload:
        parts.append("offload")
    return " ".join(parts)


def warmup_forwards(pp: int, v: int, m: int, group: int) -> int:
    """Forward passes device group ``group`` runs before its first backward under 1F1B (``pp - group
    - 1``; Narayanan et al. SC'21 §2.2.1) or, with ``v`` chunks per group, interleaved 1F1B
    (``2(pp - group - 1) + (v - 1) pp``, Megatron-LM's ``schedules.py``), at most its ``m * v``
    passes."""
    return min(m * v, pp - group - 1 if v == 1 else 2 * (pp - group - 1) + (v - 1) * pp)


def even_split(n: int, parts: int) -> list[int]:
    """``n`` items over ``parts`` buckets, sizes differing by at most one, larger first."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _override_dict(s: LayerStrategy, default: LayerStrategy | None, devices: int) -> dict[str, Any]:
    """Fields of ``s`` that differ from ``default``; ``dp`` only where it is not derivable."""
    out = s.to_dict(default)
    out.pop("dp", None)
    if s.devices != devices:
        out["dp"] = s.dp
    return out


def _stage_dict(stage: Stage, default: LayerStrategy) -> dict[str, Any]:
    only = stage.groups[0].strategy
    if len(stage.groups) == 1 and only == default and only.devices == stage.devices:
        return {"devices": stage.devices, "layers": [stage.start, stage.end]}
    groups = [
        {"range": [g.start, g.end], **_override_dict(g.strategy, default, stage.devices)} for g in stage.groups
    ]
    return {"devices": stage.devices, "layers": groups}


_PLAN_KEYS = {
    "schema_version", "global_batch_size", "num_micro_batches", "dtype", "pipeline", "strategy",
    "stages", "embedding", "head",
}


def _plan_from_dict(data: Mapping[str, Any]) -> Plan:
    unknown = sorted(set(data) - _PLAN_KEYS)
    if unknown:
        raise PlanError(unknown[0], f"unknown field (known: {', '.join(sorted(_PLAN_KEYS))})")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise PlanError("schema_version", f"{version!r} is not a known version (this galvatron reads {SCHEMA_VERSION})")
    default = data.get("strategy", {}) or {}
    if not isinstance(default, Mapping):
        raise PlanError("strategy", "must be a mapping of strategy fields")
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, Sequence) or isinstance(raw_stages, str) or not raw_stages:
        raise PlanError("stages", "must be a non-empty list of stages")
    stages = tuple(_stage_from_dict(raw, default, f"stages[{i}]") for i, raw in enumerate(raw_stages))
    pipeline = data.get("pipeline", {}) or {}
    if not isinstance(pipeline, Mapping):
        raise PlanError("pipeline", "must be a mapping with schedule and virtual_stages")
    unknown = sorted(set(pipeline) - {"schedule", "virtual_stages"})
    if unknown:
        raise PlanError(f"pipeline.{unknown[0]}", "unknown field (known: schedule, virtual_stages)")
    edges = {}
    for name, stage in (("embedding", stages[0]), ("head", stages[-1])):
        if data.get(name) is not None:
            edges[name] = LayerStrategy.from_dict({**default, **data[name]}, name, stage.devices)
    if "global_batch_size" not in data:
        raise PlanError("global_batch_size", "is required")
    return Plan(
        stages=stages,
        global_batch_size=data["global_batch_size"],
        num_micro_batches=data.get("num_micro_batches", 1),
        pipeline=Pipeline(**pipeline),
        dtype=data.get("dtype", DType.BF16),
        **edges,
    )


def _stage_from_dict(raw: Any, default: Mapping[str, Any], path: str) -> Stage:
    if not isinstance(raw, Mapping):
        raise PlanError(path, "must be a mapping with devices and layers")
    unknown = sorted(set(raw) - {"devices", "layers"})
    if unknown:
        raise PlanError(f"{path}.{unknown[0]}", "unknown field (known: devices, layers)")
    devices = _positive_int(raw.get("devices"), f"{path}.devices")
    layers = raw.get("layers")
    if _is_range(layers):
        groups = (LayerGroup(start=layers[0], end=layers[1], strategy=LayerStrategy.from_dict(
            default, f"{path}.layers[{layers[0]}:{layers[1]}]", devices)),)
        return Stage(devices=devices, groups=groups)
    if not isinstance(layers, Sequence) or isinstance(layers, str) or not layers:
        raise PlanError(f"{path}.layers", "must be [start, end] or a list of {range: [start, end], ...}")
    groups = []
    for j, entry in enumerate(layers):
        if not isinstance(entry, Mapping) or not _is_range(entry.get("range")):
            raise PlanError(f"{path}.layers[{j}]", "must be a mapping with range: [start, end]")
        start, end = entry["range"]
        overrides = {k: v for k, v in entry.items() if k != "range"}
        strategy = LayerStrategy.from_dict({**default, **overrides}, f"{path}.layers[{start}:{end}]", devices)
        groups.append(LayerGroup(start=start, end=end, strategy=strategy))
    return Stage(devices=devices, groups=tuple(groups))


def _is_range(value: Any) -> bool:
    return (
        isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
