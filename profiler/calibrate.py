"""Profiles in place of datasheet numbers: a cost-model :class:`~galvatron.strategies.cost.Perf` that
answers from measurements.

The cost model builds every layer from a few primitives (GEMM time, attention-kernel time,
memory-bound time, collectives). :func:`fit_rates` finds the seconds per unit of each primitive
for which the cost model's *own* per-layer formulas best reproduce the measured layers (least
squares on relative error, over every measured micro-batch size, sequence length and recompute
mode): the achievable rates of this GPU for this model's shapes, replacing datasheet peak times
efficiency. The memory-bound rate comes from the optimizer step, the purest streaming kernel
measured. :class:`ProfiledPerf` answers the cost model with those rates and with the measured
collective curves of a :class:`ClusterProfile`, and falls back to a base ``Perf`` (the datasheet)
for anything not measured (other link levels, host copies, device memory).

``ProfiledPerf.layer_times`` also gives the measured time of a whole layer, for a cost model that
asks for it. ``calibrated_spec`` puts the measured activation bytes into a ``ModelSpec``.

This module reads the cost model's interface, so it imports ``galvatron.strategies`` (lazily).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from galvatron.profiler.fitting import relative_nnls
from galvatron.profiler.schema import (
    BUS_FACTORS,
    ClusterProfile,
    LayerProfile,
    Measurement,
    ModelProfile,
    PhaseTimes,
    Placement,
    ProfileError,
)

from galvatron.plan import DType, LayerStrategy, Recompute
from galvatron.spec import LayerKind, LayerSpec, ModelSpec

if TYPE_CHECKING:
    from galvatron.strategies.cost import CostOptions, Group, Perf
    from galvatron.strategies.hardware import Cluster

TERMS = ("matmul", "kernel", "attention_fwd", "attention_bwd", "memory")
"""The primitives' unknowns: seconds per GEMM FLOP, per kernel launch, per attention FLOP forward
and backward, per byte of memory-bound traffic."""


@dataclass(frozen=True, kw_only=True)
class Rates:
    """Seconds per unit of each primitive (see :data:`TERMS`) at ``dtype``, fitted to a profile."""

    dtype: DType
    matmul: float
    kernel: float
    attention_fwd: float
    attention_bwd: float
    memory: float
    median_rel_error: float
    """Median relative error of the cost model's per-layer forward/backward times over the points."""
    max_rel_error: float
    """Largest one (typically the embedding, whose time is Python overhead the cost model does not model)."""
    points: int

    def describe(self, peak_flops: float | None = None) -> str:
        """One line: achieved TFLOP/s, GB/s, launch cost (and efficiencies when a peak is given)."""

        def rate(seconds: float) -> str:
            if not seconds:
                return "n/a"
            tflops = 1 / seconds / 1e12
            return f"{tflops:.1f} TFLOP/s" + (f" ({tflops * 1e12 / peak_flops:.0%})" if peak_flops else "")

        memory = f"{1 / self.memory / 1e9:.0f} GB/s" if self.memory else "n/a"
        return (f"matmul {rate(self.matmul)}, attention fwd {rate(self.attention_fwd)} / bwd "
                f"{rate(self.attention_bwd)}, memory {memory}, {self.kernel * 1e6:.1f} us per kernel; "
                f"error median {self.median_rel_error:.1%}, max {self.max_rel_error:.1%} "
                f"over {self.points} layer times")


def fit_rates(profile: ModelProfile, spec: ModelSpec | None = None, options: CostOptions | None = None) -> Rates:
    """The primitive rates for which the cost model's layer formulas best match ``profile``: least
    squares on the error relative to each measured time, each layer weighted by how many times
    ``spec`` holds it (all alike without a spec), so the rates fit the model's step best."""
    from galvatron.strategies.cost import CostOptions

    options = options or CostOptions()
    memory = _memory_rate(profile, options)
    free = [t for t in TERMS if memory is None or t != "memory"]
    counts = _counts(profile, spec)
    rows, targets, weights, measured = [], [], [], []
    for layer in profile.layers:
        for m in layer.measurements:
            features = _features(profile, layer, m, options)
            for phase, seconds in ((0, m.forward_s), (1, m.backward_s)):
                known = memory * features["memory"][phase] if memory is not None else 0.0
                rows.append([features[t][phase] for t in free])
                targets.append(seconds - known)
                measured.append((seconds, known))
                # relative to the measured time, not to the part the free terms must explain
                weights.append(counts[layer.key] * ((seconds - known) / seconds) ** 2 if seconds > 0 else 0.0)
    if not rows:
        raise ProfileError(f"the profile of {profile.model} has no measurement to calibrate from")
    x, _ = relative_nnls(rows, targets, weights)
    errors = sorted(abs(sum(r * v for r, v in zip(row, x)) + known - seconds) / seconds
                    for row, (seconds, known) in zip(rows, measured) if seconds > 0)
    values = dict(zip(free, x))
    if memory is not None:
        values["memory"] = memory
    return Rates(dtype=profile.dtype, median_rel_error=errors[len(errors) // 2] if errors else 0.0,
                 max_rel_error=errors[-1] if errors else 0.0, points=len(rows), **values)


def _counts(profile: ModelProfile, spec: ModelSpec | None) -> dict[str, int]:
    """How many layers of ``spec`` each profiled layer stands for (1 each without a spec)."""
    counts = dict.fromkeys(profile.keys, 0 if spec is not None else 1)
    for layer in spec.layers if spec is not None else ():
        found = profile.layer_for(layer)
        if found is not None:
            counts[found.key] += 1
    return counts


def _features(profile: ModelProfile, layer: LayerProfile, m: Measurement,
              options: CostOptions) -> dict[str, tuple[float, float]]:
    """(forward, backward) coefficient of each unknown in the cost model's time of this measurement."""
    from galvatron.strategies.cost import LayerContext, layer_cost

    attention = layer.attention_flops_per_token_per_seq * m.seq_len
    spec = dataclasses.replace(layer.spec, attention_flops_per_token=attention)
    strategy = LayerStrategy(recompute=m.recompute)
    out = {}
    for term in TERMS:
        ctx = LayerContext(perf=_Probe(term), options=options, dtype=profile.dtype, seq_len=m.seq_len,
                           causal=profile.causal, micro_batch=m.micro_batch, stage_devices=1)
        cost = layer_cost(ctx, spec, strategy)
        out[term] = (cost.fwd, cost.bwd)
    return out


def _memory_rate(profile: ModelProfile, options: CostOptions) -> float | None:
    """Seconds per byte from the optimizer step: the cost model's optimizer bytes for the measured
    parameter counts against the measured times (least squares through the origin)."""
    from galvatron.strategies.cost import LayerContext, layer_cost

    if profile.optimizer is None:
        return None
    pairs = []
    for params, seconds in profile.optimizer.points:
        ctx = LayerContext(perf=_Probe("memory"), options=options, dtype=profile.dtype, seq_len=1, causal=True,
                           micro_batch=1, stage_devices=1)
        stub = LayerSpec(kind=LayerKind.EMBEDDING, name="optimizer", params=params, flops_per_token=0.0)
        pairs.append((layer_cost(ctx, stub, LayerStrategy()).optim, seconds))
    num = sum(b * t for b, t in pairs)
    den = sum(b * b for b, _ in pairs)
    return num / den if den else None


@dataclass(frozen=True)
class _Probe:
    """A Perf whose every answer is the coefficient of one unknown: the cost model is linear in the
    primitives' times, so running it on probes gives each unknown's share of a layer's time."""

    term: str
    gpus_per_node: int = 1
    memory_bytes: float = float("inf")

    def peak_flops(self, dtype: str) -> float:
        return 1.0

    def matmul_time(self, flops: float, dtype: str, kernels: int = 1) -> float:
        if flops <= 0:
            return 0.0
        return {"matmul": flops, "kernel": float(kernels)}.get(self.term, 0.0)

    def attention_time(self, flops: float, backward: bool, shape: Any = None, kernel: str | None = None) -> float:
        if flops <= 0:
            return 0.0
        return {"attention_bwd" if backward else "attention_fwd": flops, "kernel": 1.0}.get(self.term, 0.0)

    def memory_time(self, nbytes: float) -> float:
        return nbytes if self.term == "memory" else 0.0

    def collective_time(self, op: str, nbytes: float, group: Any) -> float:
        return 0.0

    def p2p_time(self, nbytes: float, inter_node: bool) -> float:
        return 0.0

    def host_time(self, nbytes: float) -> float:
        return 0.0


# ------------------------------------------------------------------------------ the Perf
@dataclass(frozen=True)
class ProfiledPerf:
    """A cost-model ``Perf`` from measurements: compute from fitted :class:`Rates`, collectives and p2p
    from a :class:`ClusterProfile` (interpolated in message size; another group size of the same
    placement moves the same bus volume), everything else from ``base``."""

    base: Perf
    rates: Rates | None = None
    model: ModelProfile | None = None
    cluster: ClusterProfile | None = None
    compute_scale: float = 1.0
    """How many times longer the profiled compute (fitted rates, layer and optimizer times) takes in
    the run than when it was profiled: CPU workers that share cores (:func:`shared_cores_scale`: the
    stretch the gloo profile measured, else ``workers / cores`` when there are more workers than
    cores; the profile ran alone on one thread)."""

    def __post_init__(self) -> None:
        if not self.compute_scale > 0:
            raise ProfileError(f"compute_scale must be positive, got {self.compute_scale}")

    @property
    def gpus_per_node(self) -> int:
        return self.base.gpus_per_node

    @property
    def memory_bytes(self) -> float:
        return self.base.memory_bytes

    def peak_flops(self, dtype: str) -> float:
        return self.base.peak_flops(dtype)

    def measured_options(self, options: CostOptions) -> CostOptions:
        """``options`` with what the cluster profile measured in their place: the compute lost to
        communication beside it and how much slower the communication runs there
        (``overlap_interference``, ``overlap_comm_slowdown``, from the profile's overlap test) and the
        pipeline schedule's host time per action (``pipeline_action_s``, CPU workers)."""
        if self.cluster is None:
            return options
        overlap, action = self.cluster.overlap, self.cluster.pipeline_action_s
        if overlap is not None and overlap.interference is not None:
            options = dataclasses.replace(options, overlap_interference=overlap.interference,
                                          overlap_comm_slowdown=max(overlap.comm_slowdown, 1.0))
        if action is not None:
            options = dataclasses.replace(options, pipeline_action_s=action)
        return options

    def _scale(self, dtype: str) -> float:
        """Other dtypes than the profiled one run at the datasheet ratio of peaks."""
        if self.rates is None or dtype == self.rates.dtype.value:
            return 1.0
        return self.base.peak_flops(self.rates.dtype.value) / self.base.peak_flops(dtype)

    def matmul_time(self, flops: float, dtype: str, kernels: int = 1) -> float:
        if self.rates is None:
            return self.base.matmul_time(flops, dtype, kernels)
        if flops <= 0:
            return 0.0
        return (flops * self.rates.matmul * self._scale(dtype) + kernels * self.rates.kernel) * self.compute_scale

    def attention_time(self, flops: float, backward: bool, shape: Any = None, kernel: str | None = None) -> float:
        """The profile's fitted seconds per attention FLOP (measured at the profiled shapes and kernel)."""
        if self.rates is None:
            return self.base.attention_time(flops, backward, shape, kernel)
        if flops <= 0:
            return 0.0
        per_flop = self.rates.attention_bwd if backward else self.rates.attention_fwd
        return (flops * per_flop + self.rates.kernel) * self.compute_scale

    def memory_time(self, nbytes: float) -> float:
        if self.rates is None:
            return self.base.memory_time(nbytes)
        return nbytes * self.rates.memory * self.compute_scale

    def collective_time(self, op: str, nbytes: float, group: Group) -> float:
        if group.size <= 1 or nbytes <= 0:
            return 0.0
        placement = Placement.INTRA if group.nodes == 1 else Placement.INTER
        found = self.cluster.find(op, group.size, placement) if self.cluster else None
        if found is None:
            return self.base.collective_time(op, nbytes, group)
        # the same bus volume on the measured group size (bus bandwidth barely depends on it)
        volume = nbytes * BUS_FACTORS[op](group.size) / BUS_FACTORS[op](found.group_size)
        return found.time(volume)

    def p2p_time(self, nbytes: float, inter_node: bool) -> float:
        if nbytes <= 0:
            return 0.0
        placement = Placement.INTER if inter_node else Placement.INTRA
        found = self.cluster.find("p2p", 2, placement) if self.cluster else None
        return found.time(nbytes) if found is not None else self.base.p2p_time(nbytes, inter_node)

    def host_time(self, nbytes: float) -> float:
        return self.base.host_time(nbytes)

    def optimizer_step_time(self, params: float) -> float | None:
        """Seconds of the profiled optimizer's step over ``params`` of the model's parameters on one
        device: the profile's timed steps are linear in the parameter count, and the fixed part of
        one step (launching the fused/foreach kernels) is shared by parameter count, so the layers'
        shares add up to one step over the whole model. None without a timed optimizer."""
        if self.model is None or self.model.optimizer is None:
            return None
        opt = self.model.optimizer
        total = sum(layer.params * layer.count for layer in self.model.layers)
        seconds = opt.seconds_per_param * params + (opt.intercept_s * params / total if total else opt.intercept_s)
        return seconds * self.compute_scale

    def layer_times(self, layer: LayerSpec, micro_batch: float, seq_len: int, recompute: Recompute | str,
                    tp: int = 1, cp: int = 1) -> PhaseTimes | None:
        """Measured forward/backward seconds of ``layer`` for ``micro_batch`` samples (per data-parallel
        replica) of ``seq_len`` tokens, split ``tp`` x ``cp`` ways. None when the profile has no such
        layer (no layer of that kind, or a block whose parameter count differs by more than 1%).
        Split layers keep the fit's fixed cost and divide its token terms (tensor parallelism splits
        the GEMMs and heads, context parallelism the queries). Where the profile timed host and
        device apart, ``forward``/``backward`` are the device's and ``host_forward``/``host_backward``
        the host's (the cost model charges each pass the slower of the two summed over the layers)."""
        times = self._profiled_times(layer, micro_batch, seq_len, recompute, tp, cp)
        k = self.compute_scale
        if times is None or k == 1.0:
            return times
        return PhaseTimes(forward=times.forward * k, backward=times.backward * k,
                          host_forward=times.host_forward * k, host_backward=times.host_backward * k)

    def _profiled_times(self, layer: LayerSpec, micro_batch: float, seq_len: int, recompute: Recompute | str,
                        tp: int, cp: int) -> PhaseTimes | None:
        if self.model is None:
            return None
        try:
            found = self.model.layer_for(layer)
        except ProfileError:
            return None
        if found is None or (layer.is_block and abs(found.params - layer.params) > 0.01 * layer.params):
            return None  # a block of another shape: not this profile's to answer
        mode = Recompute(recompute) if layer.is_block else Recompute.NONE  # edges are not recomputed
        if tp * cp == 1 and float(micro_batch).is_integer():
            split = found.split_times(int(micro_batch), seq_len, mode)
            if split is None:
                return found.times(int(micro_batch), seq_len, mode)
            host, device = split
            return PhaseTimes(forward=device.forward, backward=device.backward, host_forward=host.forward,
                              host_backward=host.backward)
        fits = found.fits.get(mode)
        if fits is None:
            return None
        if found.split_times(1, seq_len, mode) is None:
            return PhaseTimes(forward=_split(fits["forward_s"].coefficients, micro_batch, seq_len, tp * cp),
                              backward=_split(fits["backward_s"].coefficients, micro_batch, seq_len, tp * cp))
        # the device's work splits; the host issues the same kernels, whatever their size
        return PhaseTimes(forward=_split(fits["device_forward_s"].coefficients, micro_batch, seq_len, tp * cp),
                          backward=_split(fits["device_backward_s"].coefficients, micro_batch, seq_len, tp * cp),
                          host_forward=_split(fits["host_forward_s"].coefficients, micro_batch, seq_len, 1),
                          host_backward=_split(fits["host_backward_s"].coefficients, micro_batch, seq_len, 1))


def _split(coef: tuple[float, float, float], micro_batch: float, seq_len: int, ways: int) -> float:
    tokens = micro_batch * seq_len
    return coef[0] + (coef[1] * tokens + coef[2] * tokens * seq_len) / ways


def profiled_perf(cluster: Cluster | Perf, *, model_profile: ModelProfile | None = None,
                  cluster_profile: ClusterProfile | None = None, spec: ModelSpec | None = None,
                  options: CostOptions | None = None, compute_scale: float = 1.0) -> ProfiledPerf:
    """The ``Perf`` to hand ``cost_plan``/``search`` instead of a cluster: measured where a profile
    is given, the datasheet (``cluster``) elsewhere. ``spec``: the model the plans are for (the
    calibration then weighs each layer by how often the model holds it); ``compute_scale``: see
    :attr:`ProfiledPerf.compute_scale`."""
    from galvatron.strategies.cost import as_perf

    rates = fit_rates(model_profile, spec, options) if model_profile is not None else None
    return ProfiledPerf(base=as_perf(cluster), rates=rates, model=model_profile, cluster=cluster_profile,
                        compute_scale=compute_scale)


def shared_cores_scale(workers_here: int, cluster_profile: ClusterProfile | None = None) -> float:
    """``ProfiledPerf.compute_scale`` for ``workers_here`` CPU workers on this machine, each on one
    thread, profiled alone: what ``cluster_profile`` measured sharing the cores stretches compute by
    (``ClusterProfile.compute_sharing``) where it profiled that many workers here; else ``workers /
    cores`` when they outnumber the cores they share; never below 1."""
    import os

    measured = getattr(cluster_profile, "compute_sharing", None)
    if measured and cluster_profile.ranks_per_node == workers_here:
        return max(1.0, measured)
    return max(1.0, workers_here / len(os.sched_getaffinity(0)))


def calibrated_spec(spec: ModelSpec, profile: ModelProfile) -> ModelSpec:
    """``spec`` with each block's ``activation_bytes_per_token`` replaced by the measured bytes kept
    without recomputation (at the spec's sequence length where measured, else the fit; per token of
    the largest measured micro-batch; rescaled to 16-bit activations as the spec counts them)."""
    scale = 2 / profile.dtype.bytes
    layers = []
    for layer in spec.layers:
        found = profile.layer_for(layer) if layer.is_block else None
        if found is None or Recompute.NONE not in found.fits:
            layers.append(layer)
            continue
        mb = max(m.micro_batch for m in found.measurements)
        kept = found.activation_bytes(mb, spec.seq_len, Recompute.NONE) / (mb * spec.seq_len)
        layers.append(dataclasses.replace(layer, activation_bytes_per_token=kept * scale))
    return dataclasses.replace(spec, layers=tuple(layers))


def profile_step_time(profile: ModelProfile, spec: ModelSpec, micro_batch: int, seq_len: int,
                      recompute: Recompute | str, micro_batches: int = 1) -> float:
    """Single-device step straight from the profile: every layer's measured (or fitted) forward and
    backward per micro-batch, plus one optimizer step over all parameters."""
    total = 0.0
    for layer, found in _profiled_layers(profile, spec):
        mode = recompute if layer.is_block else Recompute.NONE
        total += found.times(micro_batch, seq_len, mode).total * micro_batches
    if profile.optimizer is not None:
        total += profile.optimizer.step_time(spec.params)
    return total


def overlapped_step_time(profile: ModelProfile, spec: ModelSpec, micro_batch: int, seq_len: int,
                         recompute: Recompute | str, micro_batches: int = 1) -> float | None:
    """Single-device step from host and device times measured apart: the host issues work ahead of
    one GPU stream, so the forward of all layers lasts as long as the slower of the host issuing
    it and the device running it, and so does the backward; plus one optimizer step. Where one
    side dominates every layer this equals :func:`profile_step_time`; where host-bound layers
    (small, or under a Python dispatch mode such as selective recomputation) sit beside
    device-bound ones (the LM head) it is shorter, as the host catches up behind the slow kernels.
    None when the profile did not record the two apart (profiles before this field)."""
    host_fwd = host_bwd = dev_fwd = dev_bwd = 0.0
    for layer, found in _profiled_layers(profile, spec):
        mode = recompute if layer.is_block else Recompute.NONE
        split = found.split_times(micro_batch, seq_len, mode)
        if split is None:
            return None
        host, device = split
        host_fwd, host_bwd = host_fwd + host.forward, host_bwd + host.backward
        dev_fwd, dev_bwd = dev_fwd + device.forward, dev_bwd + device.backward
    total = (max(host_fwd, dev_fwd) + max(host_bwd, dev_bwd)) * micro_batches
    if profile.optimizer is not None:
        total += profile.optimizer.step_time(spec.params)
    return total


def _profiled_layers(profile: ModelProfile, spec: ModelSpec) -> Iterator[tuple[LayerSpec, LayerProfile]]:
    for layer in spec.layers:
        found = profile.layer_for(layer)
        if found is not None:
            yield layer, found
