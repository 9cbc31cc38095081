"""The hardware database: GPUs, links and clusters read from ``configs/hardware`` and ``configs/clusters``.

Every number lives in the YAML next to the public source it comes from; this module only reads and
checks it. A :class:`Cluster` is what the cost model needs to know about the machines: the GPU, how
many per node, how many nodes and the two link levels (inside a node, between nodes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import yaml

from galvatron.errors import ConfigError
from galvatron.paths import config_root, find_config


@dataclass(frozen=True, kw_only=True)
class Link:
    """One level of interconnect, per GPU: line rate, the fraction collectives reach, per-step latency."""

    name: str
    gbps: float
    """Line rate per GPU per direction, GB/s."""
    efficiency: float
    """Achieved bus bandwidth on large messages as a fraction of ``gbps`` (nccl-tests busbw)."""
    latency_us: float
    """Latency of one algorithm step, microseconds."""

    @property
    def busbw(self) -> float:
        """Achievable bus bandwidth in bytes/s."""
        return self.gbps * self.efficiency * 1e9


@dataclass(frozen=True, kw_only=True)
class GPU:
    """One accelerator model: peaks, memory and achievable efficiencies."""

    name: str
    peak_tflops: Mapping[str, float]
    memory_gib: float
    hbm_gbps: float
    matmul_efficiency: float
    matmul_efficiency_fp8: float
    attention_kernels: Mapping[str, Mapping[str, Any]]
    """Fused attention kernels on this GPU (``flash2``, ``flash3``, ``cudnn``...): for each, the
    fraction of the 16-bit peak its ``forward`` and ``backward`` reach on long sequences with many
    heads, one number or a mapping of head dim to fraction (linear in between, flat outside). How
    shorter sequences and fewer heads fall below it is the cost model's (``DatasheetPerf.attention_time``)."""
    attention_kernel: str = ""
    """The kernel PyTorch's ``scaled_dot_product_attention`` picks on this GPU (the first of
    ``attention_kernels`` when empty)."""
    attention_in_step: float = 1.0
    """Inside a training step (the power cap's clock, shared with GEMMs and memory-bound kernels) the
    fused attention kernels run at this fraction of the short-burst rates ``attention_kernels`` hold
    (1: not measured; ``attention_efficiency`` includes it)."""
    memory_efficiency: float
    streaming_efficiency: float = 0.0
    """Fraction of HBM bandwidth one large same-dtype elementwise kernel streams at (an in-place add
    of whole fp32 gradients: STREAM's add), which the step-wide ``memory_efficiency`` of many smaller
    and dtype-converting kernels falls below (0: not measured, ``memory_efficiency``)."""
    kernel_overhead_us: float
    intra_node: str
    sms: int = 0
    """Streaming multiprocessors (compute units): GEMM output tiles run in waves over them (0: unknown,
    no wave quantisation)."""
    persistent_gemms: bool = False
    """cuBLAS runs persistent, warp-specialized GEMM kernels here (Hopper, Blackwell): no wave
    quantisation and the output written while later tiles compute (``DatasheetPerf.gemm_time``)."""
    gemm_accumulate_slowdown: float = 1.0
    """A GEMM adding into an fp32 output reads and writes it after its tiles at this many times the
    streaming time (1: at the streaming rate; measured where the entry says so)."""
    unaligned_matmul_tflops: Mapping[str, float] = field(default_factory=dict)
    """Measured 16-bit GEMM TFLOP/s when a dimension is not a multiple of 8 elements (cuBLAS cannot
    use its 16-byte-aligned tensor-core kernels at full rate), ``forward`` and ``backward``; empty:
    not measured, no penalty."""
    reserved_gib: float

    def attention_efficiency(self, backward: bool, head_dim: int = 128, kernel: str | None = None) -> float:
        """Fraction of the 16-bit peak the fused attention ``kernel`` (None: this GPU's default) reaches
        on long sequences inside a training step, forward or ``backward``, at ``head_dim``: the
        kernel's burst rate times ``attention_in_step``."""
        name = kernel or self.attention_kernel or next(iter(self.attention_kernels))
        if name not in self.attention_kernels:
            raise ConfigError(f"{self.name}: no attention kernel {name!r} in the hardware database (has: "
                              f"{', '.join(self.attention_kernels)})")
        value = self.attention_kernels[name]["backward" if backward else "forward"]
        if not isinstance(value, Mapping):
            return float(value) * self.attention_in_step
        dims = sorted(value)
        if head_dim <= dims[0] or head_dim >= dims[-1]:
            return float(value[dims[0] if head_dim <= dims[0] else dims[-1]]) * self.attention_in_step
        hi = next(d for d in dims if d >= head_dim)
        lo = dims[dims.index(hi) - 1]
        return float(value[lo] + (value[hi] - value[lo]) * (head_dim - lo) / (hi - lo)) * self.attention_in_step

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for a compute dtype; raises ConfigError where the GPU has no such unit."""
        key = "fp32" if dtype == "fp32" else dtype
        if key not in self.peak_tflops:
            raise ConfigError(f"{self.name} has no {dtype} tensor cores (has: {', '.join(self.peak_tflops)})")
        return self.peak_tflops[key] * 1e12


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """GPUs, nodes and links. ``inter_gbps_per_gpu`` is the inter-node line rate one GPU can use."""

    name: str
    gpu: GPU
    gpus_per_node: int
    nodes: int
    intra: Link
    inter: Link
    nics_per_node: int

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def inter_link_per_gpu(self) -> Link:
        """The inter-node link as one GPU sees it: NIC rate times NICs per GPU."""
        share = self.nics_per_node / self.gpus_per_node
        return dataclasses.replace(self.inter, gbps=self.inter.gbps * share)

    def describe(self) -> str:
        return (f"{self.name}: {self.world_size} x {self.gpu.name} ({self.nodes} node(s) of {self.gpus_per_node}, "
                f"{self.intra.name} inside, {self.inter.name} x{self.nics_per_node} between)")


_GPU_KEYS = {f.name for f in dataclasses.fields(GPU)} | {"kind"}
_GPU_REQUIRED = {f.name for f in dataclasses.fields(GPU)
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
"""GPU keys without a default in :class:`GPU` (the others may be left out of a YAML entry)."""
_CLUSTER_KEYS = {"name", "gpu", "gpus_per_node", "nodes", "intra_node", "inter_node", "nics_per_node",
                 "inter_node_gbps", "intra_node_gbps", "memory_gib"}


def _read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: must hold a mapping")
    return dict(data)


@lru_cache(maxsize=1)
def _links() -> dict[str, Link]:
    data = _read_yaml(config_root() / "hardware" / "interconnects.yaml")
    data.pop("kind", None)
    return {name: Link(name=name, **values) for name, values in data.items()}


def link(name: str) -> Link:
    """An interconnect from ``configs/hardware/interconnects.yaml`` by name (``nvlink4``, ``ib-ndr``...)."""
    links = _links()
    if name not in links:
        raise ConfigError(f"unknown interconnect {name!r}; known: {', '.join(sorted(links))}")
    return links[name]


def gpu_names() -> list[str]:
    """Names of the GPUs in the database."""
    return sorted(p.stem for p in (config_root() / "hardware").glob("*.yaml") if p.stem != "interconnects")


DEVICE_NAMES: tuple[tuple[str, str], ...] = (
    ("H200", "H200"), ("H100 PCIe", "H100-PCIe"), ("H100", "H100-SXM"), ("A100-SXM4-40GB", "A100-40GB"),
    ("A100-PCIE-40GB", "A100-40GB"), ("A100", "A100-80GB"), ("B200", "B200"), ("L40S", "L40S"), ("MI300X", "MI300X"))
"""(part of a device name as ``torch.cuda.get_device_name`` reports it, database entry), the more
specific first: "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" the PCIe card (the same
memory, so memory cannot tell them apart), "NVIDIA A100-SXM4-40GB" the 40 GB A100."""


def gpu_for_device(device: str) -> str:
    """The database entry for a CUDA device name (``torch.cuda.get_device_name()``); ConfigError when
    the database has none."""
    for part, name in DEVICE_NAMES:
        if part in device:
            return name
    raise ConfigError(f"{device} is not in the hardware database ({', '.join(gpu_names())})")


@cache
def load_gpu(name_or_path: str) -> GPU:
    """A GPU by database name (``H100-SXM``) or from a YAML file with the same keys."""
    data = _read_yaml(find_config("hardware", name_or_path))
    unknown = sorted(set(data) - _GPU_KEYS)
    if unknown:
        raise ConfigError(f"unknown GPU key {unknown[0]!r} in {name_or_path}")
    data.pop("kind", None)
    data.setdefault("matmul_efficiency_fp8", data.get("matmul_efficiency"))
    missing = sorted(_GPU_REQUIRED - set(data))
    if missing:
        raise ConfigError(f"GPU {name_or_path}: missing key(s) {', '.join(missing)}")
    _check_attention(name_or_path, data["attention_kernels"], data.get("attention_kernel", ""))
    in_step = data.get("attention_in_step", 1.0)
    if not isinstance(in_step, (int, float)) or not 0 < in_step <= 1:
        raise ConfigError(f"GPU {name_or_path}: attention_in_step must be a fraction in (0, 1], got {in_step!r}")
    return GPU(**data)


def _check_attention(gpu: str, kernels: Any, default: str) -> None:
    if not isinstance(kernels, Mapping) or not kernels:
        raise ConfigError(f"GPU {gpu}: attention_kernels must map kernel names to efficiencies")
    for name, eff in kernels.items():
        for direction in ("forward", "backward"):
            value = eff.get(direction) if isinstance(eff, Mapping) else None
            values = list(value.values()) if isinstance(value, Mapping) else [value]
            if not values or not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in values):
                raise ConfigError(f"GPU {gpu}: attention_kernels.{name}.{direction} must be a fraction in (0, 1] "
                                  f"or a mapping of head dim to one, got {value!r}")
    if default and default not in kernels:
        raise ConfigError(f"GPU {gpu}: attention_kernel {default!r} is not in attention_kernels "
                          f"({', '.join(kernels)})")


def load_cluster(config: str | Path | Mapping[str, Any], **overrides: Any) -> Cluster:
    """A cluster from a preset name (``8xH100``), a YAML path or a dict; ``overrides`` replace keys
    (e.g. ``nodes=35``). Keys: gpu, gpus_per_node, nodes, optional intra_node, inter_node,
    nics_per_node, inter_node_gbps (per NIC), intra_node_gbps, memory_gib."""
    if isinstance(config, Mapping):
        data, name = dict(config), str(config.get("name", "cluster"))
    else:
        path = find_config("clusters", str(config))
        data, name = _read_yaml(path), path.stem
    data.update(overrides)
    unknown = sorted(set(data) - _CLUSTER_KEYS)
    if unknown:
        raise ConfigError(f"unknown cluster key {unknown[0]!r} (known: {', '.join(sorted(_CLUSTER_KEYS))})")
    for key in ("gpu", "gpus_per_node", "nodes"):
        if key not in data:
            raise ConfigError(f"cluster {name}: needs {key!r}")
    gpu = load_gpu(str(data["gpu"]))
    if "memory_gib" in data:
        gpu = dataclasses.replace(gpu, memory_gib=float(data["memory_gib"]))
    for key in ("gpus_per_node", "nodes"):
        if not isinstance(data[key], int) or data[key] < 1:
            raise ConfigError(f"cluster {name}: {key} must be a positive integer, got {data[key]!r}")
    intra = _with_rate(link(data.get("intra_node", gpu.intra_node)), data.get("intra_node_gbps"))
    inter = _with_rate(link(data.get("inter_node", "ib-ndr")), data.get("inter_node_gbps"))
    name = str(data.get("name", name))
    return Cluster(name=name, gpu=gpu, gpus_per_node=data["gpus_per_node"], nodes=data["nodes"], intra=intra,
                   inter=inter, nics_per_node=int(data.get("nics_per_node", data["gpus_per_node"])))


def _with_rate(base: Link, gbps: Any) -> Link:
    if gbps is None:
        return base
    if not isinstance(gbps, (int, float)) or gbps <= 0:
        raise ConfigError(f"link rate override for {base.name} must be a positive number of GB/s, got {gbps!r}")
    return dataclasses.replace(base, gbps=float(gbps))
