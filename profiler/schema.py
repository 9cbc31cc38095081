"""Versioned YAML profiles: what the profilers measured, in a form the cost model can read back.

A :class:`ModelProfile` holds, per distinct layer of a model (one entry per block kind, plus the
embedding and the head), forward/backward times and memory measured over micro-batch sizes,
sequence lengths and recompute modes, with fits (:class:`Fit`) for sizes not measured.
A :class:`ClusterProfile` holds collective times over message sizes per group size and placement,
the slowdown of communication running beside matmuls, and the GPUs and links NVML reported.

Both carry ``schema_version``; files written by an older version keep loading, files from a newer
one are refused with a clear :class:`ProfileError`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from galvatron.profiler.fitting import relative_nnls

from galvatron.errors import GalvatronError
from galvatron.plan import DType, Recompute
from galvatron.spec import LayerKind, LayerSpec

SCHEMA_VERSION = 1

T = TypeVar("T")


class ProfileError(GalvatronError, ValueError):
    """A profile that cannot be read, or a question it cannot answer (a mode that was not measured)."""


# ---------------------------------------------------------------------------------------- fits
FIT_TERMS = ("1", "tokens", "tokens*seq_len")
FIT_FORMULA = "c0 + c1*tokens + c2*tokens*seq_len  (tokens = micro_batch*seq_len)"


def _features(micro_batch: int, seq_len: int) -> tuple[float, float, float]:
    tokens = float(micro_batch * seq_len)
    return 1.0, tokens, tokens * seq_len


@dataclass(frozen=True, kw_only=True)
class Fit:
    """``y = c0 + c1*tokens + c2*tokens*seq_len``: a fixed cost (kernel launches), a part linear in
    tokens (matmuls, element-wise kernels) and the attention core, quadratic in sequence length.

    Fitted by :func:`~galvatron.profiler.fitting.relative_nnls` (non-negative least squares on
    relative error), so a grid with one sequence length gives ``c2 = 0``.
    """

    coefficients: tuple[float, float, float]
    max_rel_error: float = 0.0
    """Largest relative residual over the measured points."""
    formula: str = FIT_FORMULA

    def __call__(self, micro_batch: int, seq_len: int) -> float:
        return sum(c * x for c, x in zip(self.coefficients, _features(micro_batch, seq_len)))

    @classmethod
    def of(cls, points: Sequence[tuple[int, int, float]]) -> Fit:
        """Fit ``(micro_batch, seq_len, y)`` points."""
        if not points:
            raise ProfileError("cannot fit zero points")
        coef, error = relative_nnls([_features(mb, s) for mb, s, _ in points], [y for _, _, y in points])
        return cls(coefficients=(coef[0], coef[1], coef[2]), max_rel_error=error)

    def to_dict(self) -> dict[str, Any]:
        return {"formula": self.formula, "coefficients": list(self.coefficients),
                "max_rel_error": self.max_rel_error}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fit:
        coef = tuple(float(c) for c in data["coefficients"])
        if len(coef) != 3:
            raise ProfileError(f"a fit needs 3 coefficients ({FIT_FORMULA}), got {len(coef)}")
        return cls(coefficients=coef, max_rel_error=float(data.get("max_rel_error", 0.0)),  # type: ignore[arg-type]
                   formula=str(data.get("formula", FIT_FORMULA)))


# ------------------------------------------------------------------------------- model profile
@dataclass(frozen=True, kw_only=True)
class Measurement:
    """One layer at one micro-batch size, sequence length and recompute mode (medians)."""

    micro_batch: int
    seq_len: int
    recompute: Recompute
    forward_s: float
    backward_s: float
    """Backward including the recomputation the mode implies."""
    activation_bytes: float
    """Bytes the layer keeps from its forward until its backward, its output included and its inputs
    excluded: what one more such layer adds to a stack."""
    temporary_bytes: float = 0.0
    """Peak bytes above the kept activations during the forward or the backward (GPU: the caching
    allocator's peak; CPU: storages alive)."""
    host_forward_s: float | None = None
    """The forward's time on the host alone (issuing its work); None in older profiles.
    ``forward_s`` is the slower of host and device per repeat."""
    host_backward_s: float | None = None
    device_forward_s: float | None = None
    """The forward's time on the device alone (CUDA events, the host kept ahead)."""
    device_backward_s: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "recompute", Recompute(self.recompute))

    @property
    def split(self) -> bool:
        """Whether host and device times were recorded apart."""
        return all(getattr(self, name) is not None for name in SPLIT_FIELDS)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


_FITTED = ("forward_s", "backward_s", "activation_bytes", "temporary_bytes")
SPLIT_FIELDS = ("host_forward_s", "host_backward_s", "device_forward_s", "device_backward_s")
"""The :class:`Measurement` fields timing host and device apart."""


@dataclass(frozen=True, kw_only=True)
class PhaseTimes:
    """Forward and backward seconds of one layer on one micro-batch."""

    forward: float
    backward: float
    host_forward: float = 0.0
    """Seconds the host takes to issue the forward, where measured apart from the device's (then
    ``forward`` and ``backward`` are the device's alone); 0: not known."""
    host_backward: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward


@dataclass(frozen=True, kw_only=True)
class LayerProfile:
    """One distinct layer: a block kind, the embedding, or the head (final norm + head + loss)."""

    key: str
    """Unique name in the profile: the kind, with a suffix when one kind has several shapes."""
    kind: LayerKind
    module: str
    """Class name of the measured module."""
    spec: LayerSpec
    """The layer as ``ModelSpec.from_module`` describes it (shapes, FLOPs), with the model's hidden size."""
    params: int
    param_bytes: int
    count: int = 1
    """How many layers of the profiled model this entry stands for."""
    attention_flops_per_token_per_seq: float = 0.0
    """Forward attention-core FLOPs per token divided by the sequence length."""
    measurements: tuple[Measurement, ...] = ()
    fits: Mapping[Recompute, Mapping[str, Fit]] = field(default_factory=dict)
    """Per recompute mode, a fit of each measured quantity (``forward_s``, ``backward_s``,
    ``activation_bytes``, ``temporary_bytes``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", LayerKind(self.kind))
        if not self.fits and self.measurements:
            object.__setattr__(self, "fits", _fit_all(self.measurements))

    @property
    def recompute_modes(self) -> tuple[Recompute, ...]:
        return tuple(self.fits)

    def _value(self, name: str, micro_batch: int, seq_len: int, recompute: Recompute | str) -> float:
        mode = Recompute(recompute)
        for m in self.measurements:
            if (m.micro_batch, m.seq_len, m.recompute) == (micro_batch, seq_len, mode):
                return float(getattr(m, name))
        fits = self.fits.get(mode)
        if fits is None:
            measured = ", ".join(r.value for r in self.fits) or "none"
            raise ProfileError(f"layer {self.key!r}: recompute={mode.value} was not profiled (profiled: {measured})")
        return max(fits[name](micro_batch, seq_len), 0.0)

    def times(self, micro_batch: int, seq_len: int, recompute: Recompute | str = Recompute.NONE) -> PhaseTimes:
        """Forward and backward seconds: the measured median where this size was measured, else the fit."""
        return PhaseTimes(forward=self._value("forward_s", micro_batch, seq_len, recompute),
                          backward=self._value("backward_s", micro_batch, seq_len, recompute))

    def split_times(self, micro_batch: int, seq_len: int,
                    recompute: Recompute | str = Recompute.NONE) -> tuple[PhaseTimes, PhaseTimes] | None:
        """``(host, device)`` forward and backward seconds, measured apart (the measured median
        where this size was measured, else the fit); None for a profile that did not record them."""
        mode = Recompute(recompute)
        rows = [m for m in self.measurements if m.recompute is mode]
        if not rows or not all(m.split for m in rows) or any(n not in self.fits.get(mode, {}) for n in SPLIT_FIELDS):
            return None
        host = PhaseTimes(forward=self._value("host_forward_s", micro_batch, seq_len, recompute),
                          backward=self._value("host_backward_s", micro_batch, seq_len, recompute))
        device = PhaseTimes(forward=self._value("device_forward_s", micro_batch, seq_len, recompute),
                            backward=self._value("device_backward_s", micro_batch, seq_len, recompute))
        return host, device

    def activation_bytes(self, micro_batch: int, seq_len: int, recompute: Recompute | str = Recompute.NONE) -> float:
        """Bytes kept for backward (see :attr:`Measurement.activation_bytes`)."""
        return self._value("activation_bytes", micro_batch, seq_len, recompute)

    def temporary_bytes(self, micro_batch: int, seq_len: int, recompute: Recompute | str = Recompute.NONE) -> float:
        """Peak transient bytes above the kept activations."""
        return self._value("temporary_bytes", micro_batch, seq_len, recompute)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "kind": self.kind.value, "module": self.module, "spec": _plain(self.spec),
            "params": self.params, "param_bytes": self.param_bytes, "count": self.count,
            "attention_flops_per_token_per_seq": self.attention_flops_per_token_per_seq,
            "measurements": [_plain(m) for m in self.measurements],
            "fits": {mode.value: {name: fit.to_dict() for name, fit in fits.items()}
                     for mode, fits in self.fits.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerProfile:
        values = dict(data)
        spec = dict(values.get("spec") or {})
        spec["kind"] = _layer_kind(spec.get("kind"))
        values["spec"] = _build(LayerSpec, spec, f"layer {values.get('key')!r} spec")
        values["measurements"] = tuple(_build(Measurement, m, "measurement") for m in values.get("measurements", ()))
        values["fits"] = {_recompute(mode): {name: Fit.from_dict(f) for name, f in fits.items()}
                          for mode, fits in (values.get("fits") or {}).items()}
        return _build(cls, values, f"layer {values.get('key')!r}")


def _layer_kind(value: Any) -> LayerKind:
    try:
        return LayerKind(value)
    except ValueError:
        raise ProfileError(f"unknown layer kind {value!r}") from None


def _recompute(value: Any) -> Recompute:
    try:
        return Recompute(value)
    except ValueError:
        raise ProfileError(f"unknown recompute mode {value!r}") from None


def _fit_all(measurements: Sequence[Measurement]) -> dict[Recompute, dict[str, Fit]]:
    out: dict[Recompute, dict[str, Fit]] = {}
    for mode in Recompute:
        rows = [m for m in measurements if m.recompute is mode]
        if not rows:
            continue
        out[mode] = {}
        names = _FITTED + (SPLIT_FIELDS if all(m.split for m in rows) else ())
        for name in names:
            out[mode][name] = Fit.of([(m.micro_batch, m.seq_len, float(getattr(m, name))) for m in rows])
    return out


@dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    """The device a profile was measured on."""

    type: str
    """``cuda`` or ``cpu``."""
    name: str
    memory_bytes: int = 0
    torch: str = ""
    cuda: str = ""


@dataclass(frozen=True, kw_only=True)
class OptimizerProfile:
    """Optimizer step time as a line in the number of parameters it updates."""

    name: str
    """E.g. ``adamw-fused``."""
    points: tuple[tuple[int, float], ...]
    """Measured ``(parameters, seconds)`` pairs."""
    intercept_s: float
    seconds_per_param: float

    def step_time(self, params: float) -> float:
        return self.intercept_s + self.seconds_per_param * params

    @classmethod
    def of(cls, name: str, points: Sequence[tuple[int, float]]) -> OptimizerProfile:
        """Fit a line through the points (a single point: no intercept)."""
        pts = sorted(points)
        if len(pts) >= 2 and pts[-1][0] != pts[0][0]:
            (x0, y0), (x1, y1) = pts[0], pts[-1]
            slope = max((y1 - y0) / (x1 - x0), 0.0)
            intercept = max(y0 - slope * x0, 0.0)
        else:
            slope, intercept = pts[-1][1] / max(pts[-1][0], 1), 0.0
        return cls(name=name, points=tuple(pts), intercept_s=intercept, seconds_per_param=slope)


@dataclass(frozen=True, kw_only=True)
class ModelProfile:
    """Measured per-layer time and memory of a model on one device: :meth:`layer_for` finds the entry of
    any :class:`LayerSpec` of the model (same kind and parameter count)."""

    model: str
    device: DeviceInfo
    dtype: DType
    """Compute dtype (autocast) the layers ran in; parameters stay in their own dtype."""
    layers: tuple[LayerProfile, ...]
    optimizer: OptimizerProfile | None = None
    hidden: int = 0
    vocab: int = 0
    causal: bool = True
    profiled_blocks: int = 0
    """Blocks in the module that was profiled (a big model may be profiled with fewer layers)."""
    seconds: float = 0.0
    """Wall time the profiling took."""
    notes: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", DType(self.dtype))
        keys = [layer.key for layer in self.layers]
        if len(set(keys)) != len(keys):
            raise ProfileError(f"duplicate layer keys in model profile: {keys}")

    def layer(self, key: str) -> LayerProfile:
        for layer in self.layers:
            if layer.key == key:
                return layer
        raise ProfileError(f"no layer {key!r} in the profile of {self.model} (has: {', '.join(self.keys)})")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(layer.key for layer in self.layers)

    def layer_for(self, spec: LayerSpec) -> LayerProfile | None:
        """The profiled layer standing for ``spec``: the same kind and parameter count (the closest
        count when several shapes of a kind were profiled). The final norm is measured with the head,
        so a ``norm`` layer has no entry of its own: None."""
        if spec.kind is LayerKind.NORM:
            return None
        same = [layer for layer in self.layers if layer.kind is spec.kind]
        if not same:
            raise ProfileError(f"the profile of {self.model} has no {spec.kind.value} layer for {spec.name!r} "
                               f"(has: {', '.join(self.keys)})")
        return min(same, key=lambda layer: abs(layer.params - spec.params))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version, "kind": "model_profile", "model": self.model,
            "device": _plain(self.device), "dtype": self.dtype.value, "hidden": self.hidden, "vocab": self.vocab,
            "causal": self.causal,
            "profiled_blocks": self.profiled_blocks, "seconds": self.seconds, "notes": list(self.notes),
            "optimizer": _plain(self.optimizer) if self.optimizer else None,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelProfile:
        values = _check_header(data, "model_profile")
        values["device"] = _build(DeviceInfo, values["device"], "device")
        values["layers"] = tuple(LayerProfile.from_dict(layer) for layer in values.get("layers", ()))
        values["notes"] = tuple(values.get("notes", ()))
        if values.get("optimizer"):
            opt = dict(values["optimizer"])
            opt["points"] = tuple((int(p), float(t)) for p, t in opt.get("points", ()))
            values["optimizer"] = _build(OptimizerProfile, opt, "optimizer")
        return _build(cls, values, "model profile")

    def save(self, path: str | Path) -> Path:
        return _save(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> ModelProfile:
        return cls.from_dict(_load(path))


# ----------------------------------------------------------------------------- cluster profile
class Placement:
    """Where a group's ranks sit: all in one node, or spread over nodes."""

    INTRA = "intra"
    INTER = "inter"


# nccl-tests doc/PERFORMANCE.md: bus bandwidth = algorithm bandwidth * factor(n), with message
# size = the full buffer (all-gather: the output, reduce-scatter: the input).
BUS_FACTORS = {
    "all_reduce": lambda n: 2.0 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "p2p": lambda n: 1.0,
}
COLLECTIVES = tuple(BUS_FACTORS)


@dataclass(frozen=True, kw_only=True)
class CommPoint:
    """One message size: median seconds over the iterations (slowest rank)."""

    bytes: int
    time_s: float


@dataclass(frozen=True, kw_only=True)
class CollectiveProfile:
    """One collective on one group: time vs message size, and its alpha-beta fit."""

    op: str
    group_size: int
    placement: str
    points: tuple[CommPoint, ...]
    latency_s: float = 0.0
    """Alpha: the fitted time of an empty message."""
    busbw_gbps: float = 0.0
    """Bus bandwidth on the largest messages (GB/s), nccl-tests' convention."""

    def __post_init__(self) -> None:
        if self.op not in BUS_FACTORS:
            raise ProfileError(f"unknown collective {self.op!r} (known: {', '.join(COLLECTIVES)})")
        if self.placement not in (Placement.INTRA, Placement.INTER):
            raise ProfileError(f"placement must be intra or inter, got {self.placement!r}")
        if not self.points:
            raise ProfileError(f"{self.op} on {self.group_size} ranks has no measured point")
        object.__setattr__(self, "points", tuple(sorted(self.points, key=lambda p: p.bytes)))
        if not self.busbw_gbps:
            latency, busbw = _alpha_beta(self.op, self.group_size, self.points)
            object.__setattr__(self, "latency_s", latency)
            object.__setattr__(self, "busbw_gbps", busbw)

    def bus_factor(self) -> float:
        return BUS_FACTORS[self.op](self.group_size)

    def time(self, nbytes: float) -> float:
        """Seconds for a message of ``nbytes``: log-log interpolation between measured sizes; beyond the
        largest, that point plus the rest at the measured bus bandwidth; below the smallest, its time."""
        if nbytes <= 0:
            return 0.0
        pts = self.points
        if nbytes <= pts[0].bytes:
            return pts[0].time_s
        if nbytes >= pts[-1].bytes:
            extra = (nbytes - pts[-1].bytes) * self.bus_factor() / (self.busbw_gbps * 1e9)
            return pts[-1].time_s + extra
        for lo, hi in itertools.pairwise(pts):
            if lo.bytes <= nbytes <= hi.bytes:
                w = math.log(nbytes / lo.bytes) / math.log(hi.bytes / lo.bytes)
                return math.exp((1 - w) * math.log(lo.time_s) + w * math.log(hi.time_s))
        return pts[-1].time_s

    def to_dict(self) -> dict[str, Any]:
        out = _plain(self)
        out["points"] = [[p.bytes, p.time_s] for p in self.points]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CollectiveProfile:
        values = dict(data)
        values["points"] = tuple(CommPoint(bytes=int(b), time_s=float(t)) for b, t in values.get("points", ()))
        return _build(cls, values, f"collective {values.get('op')!r}")


def _alpha_beta(op: str, n: int, points: Sequence[CommPoint]) -> tuple[float, float]:
    """Latency = the smallest message's time; bus bandwidth = the best of the two largest messages
    (Hockney's alpha-beta model, as nccl-tests reports it)."""
    factor = BUS_FACTORS[op](n)
    large = points[-2:]
    busbw = max(p.bytes * factor / max(p.time_s, 1e-12) for p in large) / 1e9
    return points[0].time_s, busbw


@dataclass(frozen=True, kw_only=True)
class Overlap:
    """Communication beside compute: times relative to each running alone (1.0 = no interference)."""

    compute_slowdown: float
    """Matmul time with an all-reduce on another stream / alone."""
    comm_slowdown: float
    """All-reduce time beside matmuls / alone."""
    matmul_size: int
    message_bytes: int
    group_size: int
    interference: float | None = None
    """Compute seconds lost per second of communication beside it (``(together - alone)`` of the
    matmuls over the all-reduces' time alone): ``CostOptions.overlap_interference`` as measured.
    None in profiles from before this field."""


@dataclass(frozen=True, kw_only=True)
class GPUInfo:
    """One GPU as NVML sees it."""

    index: int
    name: str
    memory_bytes: int
    nvlinks: int = 0
    """Active NVLink links."""
    pcie_gen: int = 0
    pcie_width: int = 0


@dataclass(frozen=True, kw_only=True)
class ClusterProfile:
    """Measured collectives of a group of processes, plus the node's GPUs and links."""

    backend: str
    world_size: int
    nodes: int
    ranks_per_node: int
    collectives: tuple[CollectiveProfile, ...] = ()
    overlap: Overlap | None = None
    pipeline_action_s: float | None = None
    """Host seconds per pipeline schedule action (one chunk's forward or backward of one micro-batch)
    besides compute and handoffs, measured on CPU workers (``CostOptions.pipeline_action_s``); None
    where not measured (GPUs, an odd number of ranks, profiles from before this field)."""
    compute_sharing: float | None = None
    """CPU workers: one worker's compute time while every profiled worker of the node computes at once,
    over its time alone (one thread each): what sharing the cores stretches a model profiled alone by
    (``ProfiledPerf.compute_scale``; about ``workers / cores`` when they outnumber the cores, more where
    they also share caches and memory bandwidth). None where not measured (GPUs, profiles from before
    this field)."""
    gpus: tuple[GPUInfo, ...] = ()
    topology: tuple[tuple[str, ...], ...] = ()
    """``nvidia-smi topo -m`` style matrix between the node's GPUs: ``X``, ``NV<links>``, ``PIX``,
    ``PXB``, ``PHB``, ``NODE`` or ``SYS``."""
    seconds: float = 0.0
    notes: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def find(self, op: str, group_size: int, placement: str = Placement.INTRA) -> CollectiveProfile | None:
        """The measurement of ``op`` at this group size and placement; else the nearest group size
        measured with that placement (bus bandwidth changes little with the group size); else None."""
        same = [c for c in self.collectives if c.op == op and c.placement == placement]
        if not same:
            return None
        return min(same, key=lambda c: (abs(math.log(c.group_size / max(group_size, 1))), -c.group_size))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version, "kind": "cluster_profile", "backend": self.backend,
            "world_size": self.world_size, "nodes": self.nodes, "ranks_per_node": self.ranks_per_node,
            "seconds": self.seconds, "notes": list(self.notes),
            "gpus": [_plain(g) for g in self.gpus], "topology": [list(row) for row in self.topology],
            "overlap": _plain(self.overlap) if self.overlap else None,
            "pipeline_action_s": self.pipeline_action_s, "compute_sharing": self.compute_sharing,
            "collectives": [c.to_dict() for c in self.collectives],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterProfile:
        values = _check_header(data, "cluster_profile")
        values["collectives"] = tuple(CollectiveProfile.from_dict(c) for c in values.get("collectives", ()))
        values["gpus"] = tuple(_build(GPUInfo, g, "gpu") for g in values.get("gpus", ()))
        values["topology"] = tuple(tuple(str(x) for x in row) for row in values.get("topology", ()))
        values["notes"] = tuple(values.get("notes", ()))
        if values.get("overlap"):
            values["overlap"] = _build(Overlap, values["overlap"], "overlap")
        return _build(cls, values, "cluster profile")

    def save(self, path: str | Path) -> Path:
        return _save(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> ClusterProfile:
        return cls.from_dict(_load(path))


# ------------------------------------------------------------------------------------ plumbing
def _plain(obj: Any) -> Any:
    """A dataclass as plain YAML types (enums by value, tuples as lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, str):  # the enums here are StrEnums: store their plain value
        return str(obj)
    return obj


def _build(cls: type[T], data: Mapping[str, Any], what: str) -> T:
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProfileError(f"{what}: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    try:
        return cls(**data)
    except (TypeError, ValueError) as err:
        if isinstance(err, ProfileError):
            raise
        raise ProfileError(f"{what}: {err}") from None


def _check_header(data: Mapping[str, Any], kind: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ProfileError(f"a {kind} must be a mapping")
    if data.get("kind", kind) != kind:
        raise ProfileError(f"expected a {kind}, got a {data.get('kind')}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version < 1:
        raise ProfileError(f"{kind}: bad schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise ProfileError(f"{kind} has schema_version {version}; this galvatron reads up to {SCHEMA_VERSION}: "
                           "upgrade galvatron or re-profile")
    values = dict(data)
    values.pop("kind", None)
    return values


def _save(data: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False, width=120))
    return path


def _load(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ProfileError(f"cannot read profile {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ProfileError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, Mapping):
        raise ProfileError(f"{path}: a profile must be a mapping")
    return dict(data)


def load_profile(path: str | Path) -> ModelProfile | ClusterProfile:
    """Either kind of profile, by its ``kind`` field."""
    data = _load(path)
    kinds = {"model_profile": ModelProfile, "cluster_profile": ClusterProfile}
    if data.get("kind") not in kinds:
        raise ProfileError(f"{path}: kind must be model_profile or cluster_profile, got {data.get('kind')!r}")
    return kinds[data["kind"]].from_dict(data)
