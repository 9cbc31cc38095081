"""The cost model's view of the machine: how long a GEMM, an attention kernel, a memory-bound kernel,
a collective or a point-to-point send takes.

:class:`Perf` is the small interface the rest of the cost model calls; :class:`DatasheetPerf`
answers it from the hardware database. A measured profile (per-layer times, measured collective
bandwidths) answers the same questions and replaces it without touching any formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from galvatron.strategies.hardware import Cluster

GEMM_TILE = (256, 128)
"""Output tile of the large-GEMM kernels cuBLAS/CUTLASS pick for 16-bit inputs on A100/H100
(CUTLASS ``256x128_64x3`` on Ampere, ``128x256x64`` WGMMA on Hopper); either orientation."""


ATTENTION_BLOCK = 128
"""Query and key rows per tile of fused attention kernels (FlashAttention-2 and cuDNN on Hopper use 64-128)."""
ATTENTION_CTA_OVERHEAD = {"forward": 1.2, "backward": 2.9}
"""Fixed work of one attention thread block (loading its query tile, the softmax epilogue, writing the
output and log-sum-exp; in backward the dq/dk/dv tiles), in units of one tile-by-tile block of the
main loop; and the fixed device time of one kernel, microseconds (below). Fitted together with the
hardware database's per-kernel efficiencies to 240 kernel timings (cuDNN and FlashAttention-2,
head dim 64 and 128, 512 to 32768 tokens, 16 to 256 batch x heads, causal and not) on one H100:
benchmarks/results/attention_kernels.json."""
ATTENTION_FIXED_US = {"forward": 3.2, "backward": 2.0}


@dataclass(frozen=True)
class AttentionShape:
    """One fused attention call on one rank: ``batch_heads`` (samples x query heads) independent
    problems of ``seq`` queries against ``seq`` keys of ``head_dim``, under a ``causal`` mask or not."""

    batch_heads: float
    seq: float
    head_dim: int
    causal: bool

    def tile_factor(self, sms: int, backward: bool) -> float:
        """Time over the time at the kernel's long-sequence rate: each thread block takes one query
        tile of one head through the key tiles it needs (all of them, or up to the diagonal under a
        causal mask), plus its fixed work; blocks fill the ``sms`` in waves, and the longest block
        runs on past the average (half of it, a greedy scheduler's expected tail), or alone when the
        blocks do not fill one wave. Partial tiles cost whole ones."""
        c = ATTENTION_CTA_OVERHEAD["backward" if backward else "forward"]
        n = math.ceil(self.seq / ATTENTION_BLOCK)
        longest = n + c
        work = self.batch_heads * ((n * (n + 1) / 2 if self.causal else n * n) + c * n)
        span = work / sms + longest / 2 if self.batch_heads * n > sms else longest
        useful = self.batch_heads * (self.seq / ATTENTION_BLOCK) ** 2 / (2 if self.causal else 1)
        return span * sms / useful


class Collective:
    """Names of the collectives the cost model asks about."""

    ALL_REDUCE = "all_reduce"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_GATHER = "all_gather"
    ALL_TO_ALL = "all_to_all"


@dataclass(frozen=True)
class Group:
    """A communication group: ``size`` ranks, ``per_node`` of them inside one node."""

    size: int
    per_node: int

    @property
    def nodes(self) -> int:
        return math.ceil(self.size / self.per_node)


class Perf(Protocol):
    """Times (seconds) of the primitive operations one training step is made of."""

    gpus_per_node: int
    memory_bytes: float
    """Device memory a plan may use (capacity minus the runtime's reserve)."""

    def peak_flops(self, dtype: str) -> float: ...
    def matmul_time(self, flops: float, dtype: str, kernels: int) -> float: ...
    def attention_time(self, flops: float, backward: bool, shape: AttentionShape | None = None,
                       kernel: str | None = None) -> float: ...
    def memory_time(self, nbytes: float) -> float: ...
    def collective_time(self, op: str, nbytes: float, group: Group) -> float: ...
    def p2p_time(self, nbytes: float, inter_node: bool) -> float: ...
    def host_time(self, nbytes: float) -> float: ...


_INPUT_BYTES = {"fp32": 4, "tf32": 4, "fp8": 1}
"""Bytes per GEMM operand element by the GEMM's dtype (16-bit otherwise)."""


@dataclass(frozen=True)
class DatasheetPerf:
    """:class:`Perf` from datasheet peaks times measured achievable efficiencies (the YAML database)."""

    cluster: Cluster
    host_gbps: float = 25.0
    """Host-device copy rate for offload (PCIe Gen4 x16 achieves ~25 GB/s of 32)."""

    @property
    def gpus_per_node(self) -> int:
        return self.cluster.gpus_per_node

    @property
    def memory_bytes(self) -> float:
        gpu = self.cluster.gpu
        return (gpu.memory_gib - gpu.reserved_gib) * 2**30

    def peak_flops(self, dtype: str) -> float:
        return self.cluster.gpu.peak_flops(dtype)

    def matmul_time(self, flops: float, dtype: str, kernels: int = 1) -> float:
        """Roofline-free GEMM time: FLOPs at the measured achievable rate (MAMF) plus a fixed cost per
        kernel, which makes efficiency fall with size as in cuBLAS size sweeps."""
        if flops <= 0:
            return 0.0
        gpu = self.cluster.gpu
        eff = gpu.matmul_efficiency_fp8 if dtype == "fp8" else gpu.matmul_efficiency
        return flops / (self.peak_flops(dtype) * eff) + kernels * gpu.kernel_overhead_us * 1e-6

    def gemm_time(self, m: float, n: float, k: float, dtype: str, count: int = 1, out_bytes: float = 2.0,
                  padded: bool = True, backward: bool = False, accumulate: bool = False) -> float:
        """``count`` GEMMs of (m x k) by (k x n) in one (grouped) kernel writing ``out_bytes`` per output
        element, or, ``accumulate``, adding into an fp32 output (Megatron's weight-gradient
        accumulation into ``main_grad``). The FLOPs run at the measured achievable rate (MAMF).

        On a GPU with ``persistent_gemms`` (cuBLAS's warp-specialized persistent kernels on Hopper and
        later) tiles balance across the SMs (only fewer tiles than SMs leave some idle) and the output
        is written while later tiles compute: the time is the FLOPs' or the bytes' (inputs and output
        at the streaming HBM rate), whichever is longer, plus the kernel's fixed cost. Elsewhere the
        SMs take ``GEMM_TILE`` output tiles in waves, a last partial wave running at its fill fraction
        (NVIDIA "Matrix Multiplication Background" guide, wave quantisation: what makes
        tensor-parallel GEMMs of 2-3 waves slow), and the output is written after the tiles compute.
        Accumulating into fp32 reads and writes the output after the tiles everywhere, the GPU's
        ``gemm_accumulate_slowdown`` times slower than streaming. Measured on one H100 (device kernel
        time, calls back to back; benchmarks/results/gemm_epilogue.json): 16-bit outputs within
        2.8-4.1% mean absolute (72 GEMMs of 22B-1T tensor-parallel blocks, Mixtral, a 1.4B GPT),
        accumulation 5.0% (24).

        A 16-bit GEMM with a dimension that is not a multiple of 8 elements runs at the GPU's measured
        ``unaligned_matmul_tflops`` (forward or ``backward``) unless the stack ``padded`` it
        (torch.compile's padding, Megatron's padded vocabulary)."""
        if m <= 0 or n <= 0 or k <= 0:
            return 0.0
        gpu = self.cluster.gpu
        flops = 2.0 * m * n * k * count
        stream = gpu.hbm_gbps * 1e9 * gpu.memory_efficiency
        overhead = gpu.kernel_overhead_us * 1e-6
        output = count * m * n * (8 * gpu.gemm_accumulate_slowdown if accumulate else out_bytes) / stream
        rate = gpu.unaligned_matmul_tflops.get("backward" if backward else "forward")
        if not padded and rate and dtype in ("bf16", "fp16") and any(float(d) % 8 for d in (m, n, k)):
            return flops / (rate * 1e12) + output + overhead
        eff = gpu.matmul_efficiency_fp8 if dtype == "fp8" else gpu.matmul_efficiency
        compute = flops / (self.peak_flops(dtype) * eff)
        tiles = 0
        if gpu.sms:
            tm, tn = GEMM_TILE
            tiles = count * min(math.ceil(m / tm) * math.ceil(n / tn), math.ceil(m / tn) * math.ceil(n / tm))
        if gpu.persistent_gemms:
            compute /= min(1.0, tiles / gpu.sms) if tiles else 1.0  # fewer tiles than SMs leave SMs idle
            if accumulate:
                return compute + output + overhead
            inputs = _INPUT_BYTES.get(dtype, 2)
            return max(compute, count * (m * k + k * n) * inputs / stream + output) + overhead
        fill = tiles / (math.ceil(tiles / gpu.sms) * gpu.sms) if tiles else 1.0
        return compute / fill + output + overhead

    def attention_time(self, flops: float, backward: bool, shape: AttentionShape | None = None,
                       kernel: str | None = None) -> float:
        """Fused (flash) attention: ``flops`` at the ``kernel``'s (None: the GPU's default) long-sequence
        fraction of the 16-bit peak for the head dim; with its ``shape``, slowed by the kernel's tiles
        and waves (:meth:`AttentionShape.tile_factor`) plus its fixed device time; without, the fixed
        cost of one kernel launch."""
        if flops <= 0:
            return 0.0
        gpu = self.cluster.gpu
        eff = gpu.attention_efficiency(backward, shape.head_dim if shape else 128, kernel)
        time = flops / (self.peak_flops("bf16") * eff)
        if shape is None or not gpu.sms:
            return time + gpu.kernel_overhead_us * 1e-6
        direction = "backward" if backward else "forward"
        return time * shape.tile_factor(gpu.sms, backward) + ATTENTION_FIXED_US[direction] * 1e-6

    def memory_time(self, nbytes: float) -> float:
        """Memory-bound kernels (norms, activations, residuals, optimizer): bytes over achieved HBM rate."""
        gpu = self.cluster.gpu
        return nbytes / (gpu.hbm_gbps * 1e9 * gpu.memory_efficiency)

    def streaming_time(self, nbytes: float) -> float:
        """One large same-dtype elementwise kernel (gradient accumulation's in-place add): bytes at the
        GPU's ``streaming_efficiency`` of HBM (``memory_efficiency`` where not measured)."""
        gpu = self.cluster.gpu
        return nbytes / (gpu.hbm_gbps * 1e9 * (gpu.streaming_efficiency or gpu.memory_efficiency))

    def collective_time(self, op: str, nbytes: float, group: Group) -> float:
        """Ring/tree collectives in the alpha-beta model with NCCL's bus-bandwidth factors
        (nccl-tests doc/PERFORMANCE.md: all-reduce moves 2(n-1)/n of the data, reduce-scatter and
        all-gather (n-1)/n). A group spanning nodes is limited by the NICs of its ``per_node`` ranks."""
        n = group.size
        if n <= 1 or nbytes <= 0:
            return 0.0
        if op == Collective.ALL_TO_ALL:
            return self._all_to_all(nbytes, group)
        factor = 2.0 if op == Collective.ALL_REDUCE else 1.0
        latency = factor * self._latency(group)
        return latency + factor * (n - 1) / n * nbytes / self._busbw(group)

    def p2p_time(self, nbytes: float, inter_node: bool) -> float:
        """One send between neighbours: the link's achievable rate plus one step of latency."""
        if nbytes <= 0:
            return 0.0
        link = self.cluster.inter_link_per_gpu if inter_node else self.cluster.intra
        return link.latency_us * 1e-6 + nbytes / link.busbw

    def host_time(self, nbytes: float) -> float:
        """Copies between host and device memory (offload)."""
        return nbytes / (self.host_gbps * 1e9)

    def _busbw(self, group: Group) -> float:
        intra = self.cluster.intra.busbw
        if group.nodes == 1:
            return intra
        return min(intra, self.cluster.inter_link_per_gpu.busbw * group.per_node)

    def _latency(self, group: Group) -> float:
        intra, inter = self.cluster.intra, self.cluster.inter
        steps_intra = group.per_node - 1
        steps_inter = math.ceil(math.log2(group.nodes)) if group.nodes > 1 else 0
        return (steps_intra * intra.latency_us + 2 * steps_inter * inter.latency_us) * 1e-6

    def _all_to_all(self, nbytes: float, group: Group) -> float:
        """Each rank sends (n-1)/n of its buffer: peers in its node over the intra link, the rest
        over its share of the NICs; both run at once."""
        n, k = group.size, min(group.per_node, group.size)
        intra_bytes = nbytes * (k - 1) / n
        inter_bytes = nbytes * (n - k) / n
        t_intra = intra_bytes / self.cluster.intra.busbw
        t_inter = inter_bytes / self.cluster.inter_link_per_gpu.busbw if inter_bytes else 0.0
        return max(t_intra, t_inter) + self._latency(group)
