"""Cost of one layer under one strategy for one micro-batch on one rank: time, communication, memory.

Per block (per token, h hidden, q = heads*head_dim, kv = kv_heads*head_dim, f = FFN width):
- GEMMs: ``LayerSpec.flops_per_token`` (Narayanan et al. SC'21 Eq. 3 counting), split over ``tp``;
  backward twice the forward (input and weight gradients).
- attention core: ``attention_flops_per_token`` at the model's sequence length, halved for causal
  kernels; ring context parallelism runs ``ring - 1`` steps whose slowest rank sees full blocks with
  contiguous chunks (Liu et al. 2023) and half blocks when striped (Brandon et al. 2023).
- memory-bound kernels: bytes moved by norms, residuals, activations (see :func:`_elementwise_bytes`).
- communication volumes: Megatron TP (Shoeybi et al. 2019 f/g: two all-reduces per layer per pass;
  with SP reduce-scatter + all-gather, Korthikanti et al. 2022 §4.2.2), Ulysses (Jacobs et al. 2023
  §3: four all-to-alls of q/k/v/o per pass), ring p2p of K/V blocks, MoE dispatch/combine all-to-alls
  (Lepikhin et al. 2020) placed by the expert layout of MoE Parallel Folding (Liu et al. 2025; see
  :func:`expert_share`), ZeRO (Rajbhandari et al. 2020 §7: stage 0-2 move 2x parameters per step,
  stage 3 3x).
- memory: ZeRO paper §3.1 (2 + 2 + 12 bytes per parameter, divided per stage), activations per
  Korthikanti et al. 2022 Table 2 (replicated ``10sbh`` part divided by SP, the rest by TP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from galvatron.strategies.cost import eager, fp8
from galvatron.strategies.cost.options import CostOptions
from galvatron.strategies.cost.perf import AttentionShape, Collective, Group, Perf
from galvatron.strategies.cost.step import hidden_behind, overlapped

from galvatron.plan import CPKind, DType, LayerStrategy, Recompute
from galvatron.spec import BLOCK_KINDS, LayerKind, LayerSpec, ModelSpec

# Bytes one token moves through memory-bound kernels in the forward pass, per hidden unit, outside
# the attention core and the FFN: two norms (read + write 2h each), two residual adds (read 4h, write
# 2h each), the rotary/bias and the casts around GEMMs (~6h). Backward moves about twice as much.
_ELEMENTWISE_PER_H = 22.0


@dataclass(frozen=True)
class LayerContext:
    """What is fixed for every layer of a stage: the machine, the run and the stage's size."""

    perf: Perf
    options: CostOptions
    dtype: DType
    seq_len: int
    causal: bool
    micro_batch: int
    """Samples in one micro-batch over all data-parallel replicas (``Plan.micro_batch_size``)."""
    stage_devices: int
    micro_batches: int = 1
    """Micro-batches per optimizer step (``Plan.num_micro_batches``): whether gradients are held
    through a step's forward passes (``CostOptions.persistent_grads``)."""


@dataclass
class LayerCost:
    """Per micro-batch times (s) and per-rank bytes of one layer; ``comm`` holds exposed seconds by kind."""

    fwd: float = 0.0
    bwd: float = 0.0
    wgrad: float = 0.0
    """Weight-gradient share of ``bwd`` (what zero-bubble schedules move into bubbles)."""
    bwd_compute: float = 0.0
    """Backward compute time a gradient reduction can hide behind."""
    sync: float = 0.0
    """Per-step gradient reduction (data parallel / ZeRO 0-1)."""
    post: float = 0.0
    """Per-step parameter all-gather after the optimizer (ZeRO 1-2)."""
    optim: float = 0.0
    params: float = 0.0
    """Bytes of parameters on the rank (the compute copy)."""
    grads: float = 0.0
    optim_states: float = 0.0
    """Bytes of optimizer states on the device (fp32 master copy and Adam moments)."""
    act: float = 0.0
    """Activations kept for backward per micro-batch in flight."""
    work: float = 0.0
    """Transient memory while the layer runs (recomputed activations, gathered ZeRO-3 parameters)."""
    flops: float = 0.0
    """Hardware FLOPs per micro-batch on the rank, recomputation included."""
    comm: dict[str, float] = field(default_factory=dict)
    host_fwd: float = 0.0
    """Seconds the host needs to issue the forward, where a profile timed it apart from the device
    (``fwd`` is then the device's); 0: not known (the host is taken to run ahead)."""
    host_bwd: float = 0.0
    grad_work: float = 0.0
    """Bytes of a gradient computed while every gradient exists, before it is summed into the one it
    adds to (:func:`tied_gradient_sum`); one layer of a stage at most, so it adds up."""

    def vector(self) -> tuple[float, ...]:
        """The additive fields, in a fixed order, for fast summing in the search."""
        return (self.fwd + self.bwd, self.wgrad, self.bwd_compute, self.sync, self.post, self.optim,
                self.static, self.act, self.grads, self.fwd, self.host_fwd, self.host_bwd, self.grad_work)

    @property
    def static(self) -> float:
        """Bytes of parameters and optimizer states (gradients: ``grads``, see
        :func:`strategies.cost.step.memory_peak`)."""
        return self.params + self.optim_states


def layer_cost(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy) -> LayerCost:
    """Cost of ``layer`` under strategy ``s``; embedding, norm and head layers included (recomputation
    applies to blocks only: the edges ignore ``s.recompute``, as in Megatron)."""
    c = core_cost(ctx, layer, s)
    apply_zero(c, zero_terms(ctx, layer, s), ctx.options, recasts(ctx, layer, s.recompute))
    return c


def core_cost(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy) -> LayerCost:
    """Everything but the ZeRO/optimizer part: compute, TP/CP/EP communication, activations. It
    depends on ``dp`` only through the tokens per rank, and not on ``zero`` or ``offload`` (the
    search shares it between pipeline degrees and micro-batch counts)."""
    if layer.kind is LayerKind.EMBEDDING:
        return _embedding(ctx, layer, s)
    if layer.kind is LayerKind.NORM:
        return _norm(ctx, layer, s)
    if layer.kind is LayerKind.HEAD:
        return _head(ctx, layer, s)
    return _block(ctx, layer, s)


# ------------------------------------------------------------------ shapes and placement
def tokens_per_rank(ctx: LayerContext, s: LayerStrategy) -> float:
    """Tokens of one micro-batch on one rank: ``micro_batch / dp`` samples, ``seq / cp`` each."""
    return ctx.micro_batch / s.dp * ctx.seq_len / s.cp


def _group(ctx: LayerContext, stride: int, size: int) -> Group:
    """A group of ``size`` ranks ``stride`` apart (axis order tp, cp, dp from innermost), placed on
    the stage's devices, which fill nodes in order."""
    gpn = ctx.perf.gpus_per_node
    per_node = max(1, min(size, gpn // stride)) if stride < gpn else 1
    return Group(size=size, per_node=per_node)


def _act_bytes(ctx: LayerContext) -> int:
    return 4 if ctx.dtype is DType.FP32 else 2


def _param_bytes(ctx: LayerContext) -> int:
    return 4 if ctx.dtype is DType.FP32 else 2


def fsdp_compute(ctx: LayerContext, s: LayerStrategy) -> bool:
    """Whether the layer computes with FSDP2's 16-bit unsharded parameters: ZeRO-2/3 over more than
    one replica of a 16-bit plan on a stack whose parameters are the fp32 master weights
    (``CostOptions.master_weights = "params"``; ``MixedPrecisionPolicy(param_dtype=bf16)``)."""
    return bool(fsdp_unit(s)) and ctx.dtype is not DType.FP32 and ctx.options.master_weights == "params"


def replica_zero(s: LayerStrategy) -> int:
    """The ZeRO stage that applies to the layer: its own over more than one replica, else 0 (one
    replica has nothing to shard)."""
    return s.zero if s.dp * s.cp > 1 else 0


def fsdp_unit(s: LayerStrategy) -> int:
    """The ZeRO stage (2 or 3) of a layer FSDP2 holds as a unit (ZeRO-2/3 over more than one replica),
    else 0."""
    zero = replica_zero(s)
    return zero if zero >= 2 else 0


def stream_bytes(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy) -> tuple[int, int]:
    """Bytes per element of a block's residual stream and of its norms' output on an eager stack.
    Autocast over fp32 parameters (16-bit plans) keeps the stream fp32 and every norm computes in
    fp32; a block that FSDP2 holds (:func:`fsdp_compute`) has 16-bit parameters and FSDP2 casts its
    inputs to them (``cast_forward_inputs``), so its stream is 16-bit, and so is ``rms_norm``'s output,
    while ``layer_norm``, on autocast's fp32 list, still casts its input up and returns fp32
    (benchmarks/results/saved_activations.md). Elsewhere both are the activations' width."""
    act = _act_bytes(ctx)
    if ctx.options.elementwise != "autocast" or ctx.dtype is DType.FP32:
        return act, act
    res = act if fsdp_compute(ctx, s) else 4
    return res, 4 if res == 4 or layer.norm == "layernorm" else act


def _dense_expert_params(layer: LayerSpec, s: LayerStrategy) -> tuple[float, float]:
    """Parameters per rank outside and inside the routed experts (TP splits the rest; expert TP and
    EP split the experts)."""
    return (layer.params - layer.expert_params) / s.tp, layer.expert_params / (s.expert_tp * s.ep)


# ------------------------------------------------------------------ MoE layout
def expert_share(s: LayerStrategy) -> tuple[float, float]:
    """(dispatched, computed): routed tokens a rank dispatches and routed rows its experts compute,
    per token of its TP group's micro-batch share (``tok``) and per top-k choice, on average. With
    ``etp`` 0 every tp rank holds (or gathers) the group's tokens and runs each expert's ``1/tp``
    slice on all of them: (1, 1). Under MoE Parallel Folding (Liu et al. 2025 §3; Megatron-Core's
    alltoall token dispatcher) each rank dispatches its ``1/tp`` sequence-parallel shard, and its
    ETP group gathers ``etp`` such shards before the experts: (1/tp, etp/tp)."""
    if not s.etp:
        return 1.0, 1.0
    return 1.0 / s.tp, s.etp / s.tp


def expert_groups(ctx: LayerContext, s: LayerStrategy) -> tuple[Group, Group, Group]:
    """The ETP, EP and expert-data-parallel groups of a MoE layer: Megatron-Core's expert rank order
    (``initialize_model_parallel``: etp, ep, expert dp from innermost) over the layer's
    ``dp * tp * cp`` ranks: ``etp`` adjacent ranks, ``ep`` ranks ``etp`` apart, ``dp*tp*cp/(etp*ep)``
    ranks ``etp * ep`` apart (with ``etp`` = ``tp``: EP folded over ``dp * cp``, ``tp`` apart)."""
    e = s.expert_tp
    return _group(ctx, 1, e), _group(ctx, e, s.ep), _group(ctx, e * s.ep, max(s.devices // (e * s.ep), 1))


# ------------------------------------------------------------------ blocks
def _block(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy) -> LayerCost:
    c = LayerCost()
    tok = tokens_per_rank(ctx, s)
    mm = layer.flops_per_token * tok / s.tp
    load = moe_load(ctx, layer, s, tok)
    grouped = ctx.options.moe_grouped_gemm
    separate = ctx.options.elementwise != "fused"  # eager models' own q/k/v and gate/up linears
    nominal = _block_gemms(layer, s, tok, 1.0, grouped, separate)
    linears = _block_linears(layer, s, tok, load, grouped, separate)
    gemms = [g for g, _ in linears]
    # routing imbalance scales the routed experts' GEMMs; a spec without shapes keeps its FLOPs
    flops = mm * _gemm_flops(gemms) / _gemm_flops(nominal) if nominal else mm
    parts = _gemm_parts(ctx, gemms, flops, _gemm_dtypes(ctx, layer, s, tok, gemms, grouped))
    t_mm, dgrad, wgrad = _summed_parts(ctx, parts, flops)
    overlap_tp = ctx.options.tp_comm_overlap and s.sp and s.tp > 1
    tp_gemms = _tp_gemms(layer, s, linears, parts) if overlap_tp and parts is not None else None
    attn_fwd, attn_bwd, attn_exposed = _attention(ctx, layer, s, tok)
    ew, ew_bwd = _elementwise_times(ctx, layer, s, tok)
    if ctx.dtype is DType.FP8:
        q_fwd, q_bwd = _fp8_quantize(ctx, layer, s, tok, load, grouped)
        ew, ew_bwd = ew + q_fwd, ew_bwd + q_bwd
    fwd_compute, bwd_compute = t_mm + attn_fwd + ew, dgrad + wgrad + attn_bwd + ew_bwd
    redo = fwd_compute if s.recompute is Recompute.FULL else 0.0
    if s.recompute is Recompute.SELECTIVE:
        redo = _selective_redo(ctx, layer, s, attn_fwd, ew, t_mm)
    measured = _measured(ctx, layer, s)
    if measured is None and ctx.options.host_us_per_kernel and ctx.options.elementwise != "fused":
        c.host_fwd, c.host_bwd = _host_issue(ctx, layer, s)
    if measured is not None:
        _host_times(c, measured)
        scale = measured.backward / (bwd_compute + redo)
        fwd_compute, bwd_compute, redo, wgrad = measured.forward, scale * bwd_compute, scale * redo, scale * wgrad
    comm_fwd = _block_comm(ctx, layer, s, tok, tp_gemms)
    ep_bwd = comm_fwd["ep"]
    if ctx.options.moe_shared_expert_overlap and ep_bwd:
        comm_fwd["ep"], ep_bwd = _shared_expert_overlap(ctx, layer, s, tok, ep_bwd)
    fwd_comm_total = sum(comm_fwd.values())
    c.fwd = fwd_compute + fwd_comm_total
    c.wgrad = wgrad
    c.bwd_compute = bwd_compute
    bwd_comm = {**comm_fwd, "tp": _tp_backward_exposed(ctx, layer, s, tok, wgrad, tp_gemms), "ep": ep_bwd}
    full = s.recompute is Recompute.FULL
    c.bwd = bwd_compute + sum(bwd_comm.values()) + redo + (fwd_comm_total if full else 0.0)
    c.flops = 3 * mm + _attention_flops(ctx, layer, s, tok) * 3.5 + _recompute_flops(ctx, layer, s, tok, mm)
    c.comm = {k: comm_fwd[k] + bwd_comm[k] + (comm_fwd[k] if full else 0.0) for k in comm_fwd}
    if attn_exposed:
        c.comm["cp"] = c.comm.get("cp", 0.0) + attn_exposed
    c.act = _activation(ctx, layer, s, s.recompute) * tok
    if full or s.recompute is Recompute.SELECTIVE:
        # the recomputed tensors of the layer being differentiated live until its backward ends
        kept = 0.0 if full else _activation(ctx, layer, s, s.recompute)
        c.work = max(c.work, (_activation(ctx, layer, s, Recompute.NONE) - kept) * tok)
    return c


def _measured(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy) -> Any:
    """Measured forward/backward compute seconds of the layer (a block, the embedding or the head)
    from a profile, or None: a Perf with
    ``layer_times(layer, micro_batch, seq_len, recompute, tp=, cp=)`` (``profiler.ProfiledPerf``)
    answers for the layers it profiled; its backward includes the recomputation. The measurement
    then replaces the datasheet compute (GEMMs, attention, memory-bound kernels) of the block;
    communication stays modelled."""
    hook = getattr(ctx.perf, "layer_times", None)
    if hook is None:
        return None
    return hook(layer, ctx.micro_batch / s.dp, ctx.seq_len, s.recompute, tp=s.tp, cp=s.cp)


def _host_issue(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy) -> tuple[float, float]:
    """Host seconds to issue a block's forward and backward kernels on an eager stack
    (``CostOptions.host_us_per_kernel`` each): its memory-bound ops (:mod:`strategies.cost.eager`),
    each linear layer's GEMM and weight cast (q, k and v apart, as Hugging Face and torchtitan write
    them; two GEMMs and a gradient cast backward), the attention kernel with its memset (four
    backward). Megatron's module-level ``selective`` issues the memory-bound ops again in backward;
    full and op-level selective checkpointing (the native runtime's, torchtitan's) cost their
    measured multiples (``RECOMPUTE_HOST_FACTOR``). Under TP each linear layer adds
    ``CostOptions.tensor_parallel_host_us`` per pass, and an FSDP2 unit ``CostOptions.fsdp_host_us``."""
    ops = eager.block_traffic(layer, s, ctx.options.elementwise, _act_bytes(ctx), *stream_bytes(ctx, layer, s),
                              sp_copies=ctx.options.sequence_parallel_copies,
                              cast_first=ctx.options.cast_inputs_once)
    linears = eager.linears(layer)
    fwd = ops.kernels_fwd + 2 * linears + (2 if layer.heads else 0)
    bwd = ops.kernels_bwd + 3 * linears + (4 if layer.heads else 0)
    us = ctx.options.host_us_per_kernel * 1e-6
    tp = linears * ctx.options.tensor_parallel_host_us * 1e-6 if s.tp > 1 else 0.0
    if fsdp_unit(s):
        tp += ctx.options.fsdp_host_us[s.zero - 2] * 1e-6
    op_level = s.recompute is Recompute.SELECTIVE and ctx.options.selective in ("matmuls", "torchtitan")
    if s.recompute is Recompute.FULL or op_level:
        f, b = RECOMPUTE_HOST_FACTOR[s.recompute]
        return (fwd * us + tp) * f, (bwd * us + tp) * b
    redo = ops.kernels_fwd if s.recompute is Recompute.SELECTIVE else 0
    return fwd * us + tp, (bwd + redo) * us + tp


RECOMPUTE_HOST_FACTOR = {Recompute.SELECTIVE: (3.0, 2.6), Recompute.FULL: (1.5, 2.0)}
"""Host time of a block's forward and backward under recomputation over the same block without:
op-level selective checkpointing (``torch.utils.checkpoint`` with a policy: a dispatch mode sees
every op, in the forward and again in the recomputation) and full checkpointing (the wrapper, and
the forward issued again in backward). Medians over the profiled configurations of the GPT-3 XL and
Llama 3.2 1B blocks on one H100 host: selective forward 3.03 / 3.04, backward 2.44 / 2.80; full 1.54 /
1.43 and 2.04 / 1.94 (benchmarks/results/profile_fidelity*.profile.yaml)."""


def _host_times(c: LayerCost, measured: Any) -> None:
    """Host issue times of a measurement that has them (``profiler.PhaseTimes.host_forward``)."""
    c.host_fwd = getattr(measured, "host_forward", 0.0)
    c.host_bwd = getattr(measured, "host_backward", 0.0)


Gemm = tuple[float, float, float, int]
"""(m, n, k, count): ``count`` GEMMs of (m x k) by (k x n) in one kernel."""


def _gemm_flops(gemms: list[Gemm]) -> float:
    return sum(2 * m * n * k * count for m, n, k, count in gemms)


def moe_load(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, tok: float) -> float:
    """Routed tokens on the busiest expert-parallel rank over the mean (1 for dense blocks):
    ``CostOptions.moe_imbalance`` or the expected maximum under random top-k routing, capped by the
    capacity factor when tokens are dropped."""
    if not layer.experts:
        return 1.0
    opts = ctx.options
    load = opts.moe_imbalance
    if load is None:
        routed = tok * layer.top_k * expert_share(s)[1]  # rows one rank's experts receive on average
        load = 1.0 + math.sqrt(2 * math.log(s.ep) * (1 - 1 / s.ep) / routed) if s.ep > 1 and routed else 1.0
    if opts.moe_capacity_factor is not None:
        load = min(load, opts.moe_capacity_factor)
    return load


def _block_gemms(layer: LayerSpec, s: LayerStrategy, tok: float, load: float = 1.0,
                 grouped: bool = True, separate: bool = False) -> list[Gemm]:
    """A block's forward GEMMs on one rank (Megatron column/row split over ``tp``): QKV, output
    projection, FFN up(+gate) and down; routed experts over the rank's ``experts / ep`` experts split
    over ``etp`` (:attr:`LayerStrategy.expert_tp`), each receiving ``load * c * tok * ep * top_k /
    experts`` tokens (``c``: rows computed per token, :func:`expert_share`; ``load``: the busiest
    rank's share over the mean, :func:`moe_load`), as one grouped GEMM per projection or, not
    ``grouped``, one GEMM per expert (``CostOptions.moe_grouped_gemm``). Empty when the spec lacks
    the shapes (the caller then uses FLOPs alone). ``separate``: q, k and v, and a gated unit's gate
    and up projections, are GEMMs of their own (Hugging Face and torchtitan models, run eagerly; the
    narrow k and v of GQA can fill fewer tiles than the GPU has SMs) instead of Megatron's fused ones."""
    return [g for g, _ in _block_linears(layer, s, tok, load, grouped, separate)]


def _block_linears(layer: LayerSpec, s: LayerStrategy, tok: float, load: float = 1.0,
                   grouped: bool = True, separate: bool = False) -> list[tuple[Gemm, str]]:
    """:func:`_block_gemms` with each GEMM's role (:data:`strategies.cost.fp8.NORM` ...): the
    attention's and a dense MLP's input projections read what the norm before them wrote and are
    column-parallel, the output and down projections row-parallel, routed experts local, shared
    experts' up projections column-parallel on the norm's output through the router."""
    h, q, kv, f = layer.hidden, layer.heads * layer.head_dim, layer.kv_heads * layer.head_dim, layer.ffn_hidden
    up = _up_width(layer)
    if not (h and q and f) or up <= 0:
        return []
    tp = s.tp
    qkv_apart = separate and not layer.fused_qkv
    attention: list[Gemm] = [(tok, q / tp, h, 1), (tok, kv / tp, h, 1), (tok, kv / tp, h, 1)] if qkv_apart else [
        (tok, (q + 2 * kv) / tp, h, 1)]
    out = [(g, fp8.NORM) for g in attention] + [((tok, h, q / tp, 1), fp8.ROW)]
    if not layer.experts:
        gated = separate and not layer.fused_gate_up and eager.up_projections(layer) == 2
        ups: list[Gemm] = [(tok, up / 2 / tp, h, 1)] * 2 if gated else [(tok, up / tp, h, 1)]
        return [*out, *((g, fp8.NORM) for g in ups), ((tok, h, f / tp, 1), fp8.ROW)]
    shared = _shared_expert_gemms(layer, s, tok)
    return (out + [(g, fp8.LOCAL) for g in _routed_gemms(layer, s, tok, load, grouped)]
            + [(g, fp8.COLUMN if i % 2 == 0 else fp8.ROW) for i, g in enumerate(shared)])


def _routed_gemms(layer: LayerSpec, s: LayerStrategy, tok: float, load: float, grouped: bool) -> list[Gemm]:
    """The routed experts' up and down GEMMs on one rank (see :func:`_block_gemms`)."""
    h, f, up = layer.hidden, layer.ffn_hidden, _up_width(layer)
    local, etp = max(layer.experts // s.ep, 1), s.expert_tp
    per_expert = load * expert_share(s)[1] * tok * s.ep * layer.top_k / layer.experts
    experts = [(per_expert, up / etp, h, local), (per_expert, h, f / etp, local)]
    if not grouped:
        experts = [(m, n, k, 1) for m, n, k, _ in experts] * local
    return experts


def _fused_experts_see_fp32(ctx: LayerContext) -> bool:
    """Whether fused experts' own code sees fp32 weights: an fp32 plan, or fp32 parameters
    (``CostOptions.master_weights = "params"``) that the stack does not hand them as 16-bit copies
    (``CostOptions.cast_fused_experts``)."""
    opts = ctx.options
    return ctx.dtype is DType.FP32 or (opts.master_weights == "params" and not opts.cast_fused_experts)


def expert_gemm_dtype(ctx: LayerContext, layer: LayerSpec) -> str:
    """The dtype the routed experts' GEMMs run in: the plan's, except where they bypass autocast
    (``LayerSpec.experts_outside_autocast``) and see fp32 weights (:func:`_fused_experts_see_fp32`): fp32."""
    if layer.experts_outside_autocast and _fused_experts_see_fp32(ctx):
        return DType.FP32.value
    return ctx.dtype.value


def _gemm_dtypes(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, tok: float, gemms: list[Gemm],
                 grouped: bool) -> list[str] | None:
    """Per GEMM of :func:`_block_gemms`, its dtype where the routed experts run in another than the
    plan's (:func:`expert_gemm_dtype`), else None."""
    wide = expert_gemm_dtype(ctx, layer)
    if not gemms or not layer.experts or wide == ctx.dtype.value:
        return None
    routed, shared = len(_routed_gemms(layer, s, tok, 1.0, grouped)), len(_shared_expert_gemms(layer, s, tok))
    dt = ctx.dtype.value
    return [dt] * (len(gemms) - routed - shared) + [wide] * routed + [dt] * shared


def _up_width(layer: LayerSpec) -> float:
    """Output width of one FFN's (or expert's) up projection: ``f``, or ``2f`` with a gated unit, from
    its multiply-adds (:func:`strategies.cost.eager.ffn_macs`). A width within 1% of ``f`` or ``2f`` is
    taken as exactly that: FLOPs outside the GEMMs (a shared expert's gate) must not make an aligned
    width look odd, which the GEMM model prices as unaligned."""
    if not layer.hidden:
        return 0.0
    f = layer.ffn_hidden
    up = eager.ffn_macs(layer) / layer.hidden - f
    return next((w for w in (f, 2 * f) if f and abs(up - w) <= 0.01 * w), up)


def _shared_expert_gemms(layer: LayerSpec, s: LayerStrategy, tok: float) -> list[Gemm]:
    """The shared experts' up and down GEMMs over every token of the rank (split over ``tp``)."""
    if not layer.shared_experts:
        return []
    n, h, f = layer.shared_experts, layer.hidden, layer.ffn_hidden
    return [(tok, n * _up_width(layer) / s.tp, h, 1), (tok, h, n * f / s.tp, 1)]


def _shared_expert_overlap(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, tok: float,
                           a2a: float) -> tuple[float, float]:
    """Exposed forward and backward dispatch/combine seconds when the shared experts' GEMMs run
    beside them (Megatron-Core ``moe_shared_expert_overlap``: shared FC1 beside the dispatch, FC2
    beside the combine); the hidden part still costs ``overlap_interference`` of its time."""
    shared = _shared_expert_gemms(layer, s, tok)
    fwd, dgrad, wgrad = _gemm_times(ctx, shared, _gemm_flops(shared)) if shared else (0.0, 0.0, 0.0)
    return hidden_behind(a2a, fwd, ctx.options), hidden_behind(a2a, dgrad + wgrad, ctx.options)


GemmTimes = tuple[float, float, float]
"""Forward, input-gradient and weight-gradient seconds of some GEMMs."""


def _gemm_times(ctx: LayerContext, gemms: list[Gemm], flops: float, dtypes: list[str] | None = None,
                dtype: str | None = None) -> tuple[float, float, float]:
    """Forward, input-gradient and weight-gradient time of ``gemms`` (whose forward FLOPs the spec
    counts as ``flops``), each in ``dtype`` (None: the plan's) or its own (``dtypes``): the sums of
    :func:`_gemm_parts`. Without shapes, or on a Perf without ``gemm_time`` (a measured profile),
    FLOPs at the Perf's GEMM rate for four kernels each way."""
    dtype = dtype or ctx.dtype.value
    return _summed_parts(ctx, _gemm_parts(ctx, gemms, flops, dtypes or [dtype] * len(gemms)), flops, dtype)


def _summed_parts(ctx: LayerContext, parts: list[GemmTimes] | None, flops: float,
                  dtype: str | None = None) -> GemmTimes:
    """The forward, input-gradient and weight-gradient sums of :func:`_gemm_parts`; without parts,
    ``flops`` at the Perf's GEMM rate in ``dtype`` (None: the plan's) for four kernels each way."""
    if parts is None:
        t = ctx.perf.matmul_time(flops, dtype or ctx.dtype.value, kernels=4)
        return t, t, t
    return sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts)


def _gemm_parts(ctx: LayerContext, gemms: list[Gemm], flops: float,
                dtypes: list[str] | None = None) -> list[GemmTimes] | None:
    """Per GEMM of ``gemms``, its forward, input-gradient and weight-gradient time, scaled so that
    they add up to the spec's ``flops``. Input gradients are (m x n) by (n x k); weight gradients
    (k x m) by (m x n), added into the fp32 main gradient where the stack does
    (``CostOptions.wgrad_fp32_accumulation``, Megatron's gradient-accumulation fusion) or written in
    16 bits (in fp32 by an fp32 GEMM). Eager stacks run odd-sized GEMMs (a vocabulary like 50257)
    unpadded. None without shapes or on a Perf without ``gemm_time``."""
    perf, dt = ctx.perf, ctx.dtype.value
    gemm = getattr(perf, "gemm_time", None)
    total = sum(2 * m * n * k * count for m, n, k, count in gemms)
    if gemm is None or not total:
        return None
    # eager stacks write 16-bit weight gradients (cast or copied out: eager.param_traffic)
    fused = ctx.options.elementwise == "fused"
    acc = wgrad_accumulates(ctx)
    scale = flops / total
    parts = []
    for (m, n, k, count), d in zip(gemms, dtypes or [dt] * len(gemms), strict=True):
        out = 4 if d == DType.FP32.value else _act_bytes(ctx)
        parts.append((scale * gemm(m, n, k, d, count, padded=fused),
                      scale * gemm(m, k, n, d, count, padded=fused, backward=True),
                      scale * gemm(k, n, m, d, count, out_bytes=out, padded=fused, backward=True, accumulate=acc)))
    return parts


def _sixteen_bit(ctx: LayerContext) -> str:
    """The dtype of what an ``fp8`` plan keeps outside its blocks' linear layers (bf16: the embedding,
    the output layer, attention: :mod:`strategies.cost.fp8`); the plan's own dtype otherwise."""
    return DType.BF16.value if ctx.dtype is DType.FP8 else ctx.dtype.value


def _attention_flops(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, tok: float) -> float:
    """Forward attention-core FLOPs per rank actually executed (causal kernels skip half)."""
    full = layer.attention_flops_per_token * tok / s.tp
    return full * (0.5 if ctx.causal and ctx.options.flash_attention else 1.0)


def _attention(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, tok: float) -> tuple[float, float, float]:
    """Forward and backward time of the attention core and the ring p2p time it could not hide."""
    if not layer.heads:
        return 0.0, 0.0, 0.0
    perf = ctx.perf
    full = layer.attention_flops_per_token * tok / s.tp
    if not ctx.options.flash_attention:
        score_bytes = (9 + (3 if ctx.options.dropout else 0)) * layer.heads / s.tp * ctx.seq_len * tok
        fwd = perf.matmul_time(full, _sixteen_bit(ctx), kernels=2) + perf.memory_time(score_bytes)
        bwd = perf.matmul_time(2 * full, _sixteen_bit(ctx), kernels=4) + perf.memory_time(2 * score_bytes)
        return fwd, bwd, 0.0
    ring = s.ring_degree
    if ring <= 1:
        frac = 0.5 if ctx.causal else 1.0
        shape, kernel = _attention_shape(ctx, layer, s, ctx.causal), ctx.options.attention_kernel
        return (perf.attention_time(full * frac, False, shape, kernel),
                perf.attention_time(2.5 * full * frac, True, shape, kernel), 0.0)
    return _ring_attention(ctx, layer, s, tok, full)


def _attention_shape(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, causal: bool) -> AttentionShape:
    """One rank's attention kernel call (or one ring step's): its samples times the query heads
    Ulysses and TP leave it, over the sequence chunk the ring leaves it."""
    heads = layer.heads / (s.tp * s.ulysses_degree)
    return AttentionShape(batch_heads=ctx.micro_batch / s.dp * heads, seq=ctx.seq_len / s.ring_degree,
                          head_dim=layer.head_dim, causal=causal)


def _ring_attention(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, tok: float,
                    full: float) -> tuple[float, float, float]:
    """Ring attention: ``r - 1`` steps, each the max of one K/V block transfer and one block of
    compute (a hidden transfer still costs ``overlap_interference`` of its time); contiguous chunks
    under a causal mask leave the last rank a full block every step (Liu et al. 2023), striped and
    USP-balanced layouts give every rank half a block (Brandon et al. 2023; Fang & Zhao 2024 §4.3)."""
    perf, r = ctx.perf, s.ring_degree
    block = full / r
    step = block if (not ctx.causal or s.cp_kind is CPKind.RING) else block / 2
    diag = block / 2 if ctx.causal else block
    kv_bytes = tok * 2 * layer.kv_heads * layer.head_dim / s.tp * _act_bytes(ctx)
    inter = _group(ctx, s.tp * s.ulysses_degree, r).nodes > 1
    send = perf.p2p_time(kv_bytes, inter)
    kernel = ctx.options.attention_kernel
    # a causal ring's diagonal block is a causal call; contiguous steps are full blocks, striped and
    # USP-balanced ones half blocks shaped like a causal call
    diag_shape = _attention_shape(ctx, layer, s, ctx.causal)
    step_shape = _attention_shape(ctx, layer, s, ctx.causal and s.cp_kind is not CPKind.RING)
    fwd_step = perf.attention_time(step, False, step_shape, kernel)
    bwd_step = perf.attention_time(2.5 * step, True, step_shape, kernel)
    send_bwd = perf.p2p_time(2 * kv_bytes, inter)
    fwd_x, bwd_x = hidden_behind(send, fwd_step, ctx.options), hidden_behind(send_bwd, bwd_step, ctx.options)
    fwd = perf.attention_time(diag, False, diag_shape, kernel) + (r - 1) * (fwd_step + fwd_x)
    bwd = perf.attention_time(2.5 * diag, True, diag_shape, kernel) + (r - 1) * (bwd_step + bwd_x)
    return fwd, bwd, (r - 1) * (fwd_x + bwd_x)


def _elementwise_times(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, tok: float) -> tuple[float, float]:
    """Forward and backward seconds of a block's memory-bound kernels: the fused stack's bytes
    (backward twice the forward), or an eager stack's op by op (:mod:`strategies.cost.eager`) with
    the fixed cost of each kernel, plus the per-parameter casts and FSDP2 copies of its weights."""
    stack = ctx.options.elementwise
    if stack == "fused":
        ew = ctx.perf.memory_time(_elementwise_bytes(ctx, layer, s) * tok)
        return ew, 2 * ew
    traffic = eager.block_traffic(layer, s, stack, _act_bytes(ctx), *stream_bytes(ctx, layer, s),
                                  sp_copies=ctx.options.sequence_parallel_copies,
                                  cast_first=ctx.options.cast_inputs_once)
    return _traffic_times(ctx, traffic.scaled(tok))


def _fp8_quantize(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, tok: float, load: float,
                  grouped: bool) -> tuple[float, float]:
    """Forward and backward seconds of Transformer Engine's FP8 casts and transposes of a block's GEMM
    operands (``fp8`` plans; :mod:`strategies.cost.fp8`), over Megatron's fused linears."""
    traffic = eager.Traffic()
    for (m, n, k, count), role in _block_linears(layer, s, tok, load, grouped):
        traffic += fp8.gemm_quantize(role, m, n, k, count, s.tp, s.sp, ctx.options.fp8_scaling)
    return _traffic_times(ctx, traffic)


def _param_traffic(ctx: LayerContext, s: LayerStrategy, params: float) -> eager.Traffic:
    """Per-parameter kernels of the rank's weights: autocast's casts where it runs over fp32 parameters
    (not in fp32 plans, nor on FSDP2's 16-bit ones), FSDP2's copies under ZeRO-2/3."""
    zero = replica_zero(s)
    stack = ctx.options.elementwise
    if stack == "autocast" and (ctx.dtype is DType.FP32 or fsdp_compute(ctx, s)):
        stack = "eager"
    fsdp2 = ctx.options.master_weights == "params"
    return eager.param_traffic(stack, _act_bytes(ctx), ctx.options.grad_bytes, zero, fsdp2,
                               s.dp * s.cp).scaled(params)


def accumulated_micro_batches(ctx: LayerContext) -> int:
    """Micro-batches whose weight gradients autograd adds up outside the GEMMs: the step's, on a stack
    whose weight-gradient GEMMs do not accumulate themselves (``CostOptions.wgrad_fp32_accumulation``),
    else 1. The search keys a layer's ZeRO part by it."""
    return 1 if wgrad_accumulates(ctx) else ctx.micro_batches


def wgrad_accumulates(ctx: LayerContext) -> bool:
    """Whether the weight-gradient GEMMs add into the fp32 gradient (``CostOptions.wgrad_fp32_accumulation``;
    None: exactly on the ``fused`` stack)."""
    acc = ctx.options.wgrad_fp32_accumulation
    return ctx.options.elementwise == "fused" if acc is None else acc


def _accumulate_traffic(ctx: LayerContext, zero: int, fsdp2: bool) -> eager.Traffic:
    """Gradient accumulation over a step's micro-batches where the weight-gradient GEMMs do not add
    into the gradient themselves (:func:`strategies.cost.eager.accumulate_traffic`), averaged over
    the micro-batches (the first one's gradient is kept as it is). The gradient is held unsharded
    (ZeRO-0/1; FSDP2 at ZeRO-2/3 adds each micro-batch's reduce-scattered shard, 1/dp of it, which
    is not charged), in fp32 where the parameters are fp32 (autocast casts each gradient back before
    it is added), else in ``CostOptions.grad_bytes`` (Megatron-LM 2021's fp16 gradients). Each add is
    one large kernel at the streaming rate (``DatasheetPerf.streaming_time``): 4.27 TB/s (0.89 of HBM)
    for Llama 2 7B's weight-shaped fp32 adds inside a step at four micro-batches on one H200
    (benchmarks/results/multi_gpu/plans_llama2-7b_fake2_accumulation.json), where the step's
    memory-bound kernels average 0.64."""
    m = accumulated_micro_batches(ctx)
    if m <= 1 or (zero >= 2 and fsdp2):
        return eager.Traffic()
    fp32_params = ctx.options.master_weights == "params"
    new = 4 if fp32_params else _act_bytes(ctx)
    held = 4 if fp32_params else ctx.options.grad_bytes
    return eager.accumulate_traffic(new, held).scaled((m - 1) / m)


def _traffic_times(ctx: LayerContext, t: eager.Traffic) -> tuple[float, float]:
    """Forward and backward seconds of eager kernels: bytes at HBM rate plus each kernel's fixed cost."""
    launch = getattr(getattr(ctx.perf, "cluster", None), "gpu", None)
    fixed = launch.kernel_overhead_us * 1e-6 if launch is not None else 0.0
    perf = ctx.perf
    return perf.memory_time(t.fwd) + t.kernels_fwd * fixed, perf.memory_time(t.bwd) + t.kernels_bwd * fixed


def _elementwise_bytes(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy) -> float:
    """Forward bytes per token through memory-bound kernels on one rank: ``22h`` of norms/residuals
    (replicated over TP unless SP), ``6f`` of the activation function and ``4(q + 2kv)`` of rotary
    and reshapes (split over TP); MoE adds ``8h`` per routed row for permutation."""
    h = layer.hidden
    q, kv = layer.heads * layer.head_dim, layer.kv_heads * layer.head_dim
    routed = layer.top_k + layer.shared_experts if layer.experts else 1
    replicated = _ELEMENTWISE_PER_H * h + (7 * h if ctx.options.dropout else 0)
    sharded = 6 * layer.ffn_hidden * routed + 4 * (q + 2 * kv)
    moe = 8 * h * layer.top_k * expert_share(s)[1] if layer.experts else 0
    scale = _act_bytes(ctx) / 2
    return scale * (replicated / (s.tp if s.sp else 1) + sharded / s.tp + moe)


def _block_comm(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, tok: float,
                tp_gemms: list[tuple[GemmTimes, GemmTimes]] | None = None) -> dict[str, float]:
    """Forward communication per micro-batch by kind (tp, cp, ep: the token dispatch); backward moves
    the same volumes. With ``tp_gemms`` (``CostOptions.tp_comm_overlap``: per TP part, the times of
    its column- and row-parallel GEMMs) each all-gather hides behind the column GEMM that reads it
    and each reduce-scatter behind the row GEMM that writes it."""
    perf, ab = ctx.perf, _act_bytes(ctx)
    out: dict[str, float] = {"tp": 0.0, "cp": 0.0, "ep": 0.0}
    if s.tp > 1:
        tensor = tok * layer.hidden * ab
        group = _group(ctx, 1, s.tp)
        n = _tp_parts(layer, s)
        if s.sp:
            ag = perf.collective_time(Collective.ALL_GATHER, tok * layer.hidden * _gather_bytes(ctx), group)
            rs = perf.collective_time(Collective.REDUCE_SCATTER, tensor, group)
            if tp_gemms is not None:
                out["tp"] = sum(hidden_behind(ag, col[0], ctx.options) + hidden_behind(rs, row[0], ctx.options)
                                if any(col) or any(row) else ag + rs for col, row in tp_gemms)
            else:
                out["tp"] = n * (ag + rs)
        else:
            out["tp"] = n * perf.collective_time(Collective.ALL_REDUCE, tensor, group)
    if s.ulysses_degree > 1 and layer.heads:
        q, kv = layer.heads * layer.head_dim, layer.kv_heads * layer.head_dim
        group = _group(ctx, s.tp, s.ulysses_degree)
        out["cp"] = sum(perf.collective_time(Collective.ALL_TO_ALL, tok * width / s.tp * ab, group)
                        for width in (q, kv, kv, q))
    if layer.experts:
        out["ep"] = _dispatch_comm(ctx, layer, s, tok)
    return out


def _gather_bytes(ctx: LayerContext) -> int:
    """Bytes per element of what sequence parallelism all-gathers: the activations, or in an ``fp8``
    plan their FP8 copies (Transformer Engine quantizes before it gathers: :mod:`strategies.cost.fp8`)."""
    return 1 if ctx.dtype is DType.FP8 else _act_bytes(ctx)


def _tp_gemms(layer: LayerSpec, s: LayerStrategy, linears: list[tuple[Gemm, str]],
              parts: list[GemmTimes]) -> list[tuple[GemmTimes, GemmTimes]]:
    """Per tensor-parallel part of a block (:func:`_tp_parts`: the attention, then the MLP), the summed
    times (``parts``: :func:`_gemm_parts` of ``linears``) of its column-parallel GEMMs (whose input
    sequence parallelism gathers) and of its row-parallel ones (whose output it reduce-scatters).
    Routed experts belong to neither: a MoE layer's TP collectives gather and scatter the tokens
    around its router and dispatch, with no GEMM beside them but its shared experts' (zero times: the
    part's collectives run as without the overlap)."""
    roles = [r for _, r in linears]
    first_row = roles.index(fp8.ROW) + 1 if layer.heads and fp8.ROW in roles else 0
    out = []
    for lo, hi in ((0, first_row), (first_row, len(roles))):
        col = [p for p, r in zip(parts[lo:hi], roles[lo:hi], strict=True) if r in (fp8.NORM, fp8.COLUMN)]
        row = [p for p, r in zip(parts[lo:hi], roles[lo:hi], strict=True) if r == fp8.ROW]
        if hi > lo:
            out.append(tuple(tuple(sum(t[i] for t in side) for i in range(3)) for side in (col, row)))
    return out[:_tp_parts(layer, s)]  # type: ignore[return-value]


def _tp_parts(layer: LayerSpec, s: LayerStrategy) -> int:
    """Sub-blocks whose Megatron TP collectives run over ``tp``: attention and the MLP; under MoE
    Parallel Folding the routed experts use their own ETP group (:func:`_dispatch_comm`) and only
    shared experts keep the MLP's TP collectives."""
    attention = 1 if layer.heads else 0
    if s.etp and layer.experts:
        return attention + (1 if layer.shared_experts else 0)
    return attention + 1


def _dispatch_comm(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, tok: float) -> float:
    """Forward token-dispatch seconds of a MoE block: the dispatch and combine all-to-alls over the EP
    group (GShard, Lepikhin et al. 2020 §2.2: each moves ``top_k`` hidden vectors per dispatched
    token, at the busiest rank's load, :func:`moe_load`), placed as :func:`expert_groups` says; under
    MoE Parallel Folding with ``etp > 1``, Megatron-Core's alltoall dispatcher also all-gathers the
    received rows over the ETP group before the experts and reduce-scatters them after."""
    dispatched, computed = expert_share(s)
    row = moe_load(ctx, layer, s, tok) * tok * layer.top_k * layer.hidden * _act_bytes(ctx)
    etp, ep, _ = expert_groups(ctx, s)
    t = 2 * ctx.perf.collective_time(Collective.ALL_TO_ALL, row * dispatched, ep) if s.ep > 1 else 0.0
    if s.etp > 1:
        rows = row * computed
        t += sum(ctx.perf.collective_time(op, rows, etp) for op in (Collective.ALL_GATHER, Collective.REDUCE_SCATTER))
    return t


def _tp_backward_exposed(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, tok: float, wgrad: float,
                         tp_gemms: list[tuple[GemmTimes, GemmTimes]] | None = None) -> float:
    """Backward TP collectives per attention/MLP part. Without SP, Megatron's ``f`` (identity
    forward) all-reduces the column-parallel GEMM's input gradient, overlapped with that GEMM's
    weight gradient (async grad all-reduce); ``g`` after the row-parallel GEMM is identity backward
    (Shoeybi et al. 2019 Fig. 3). With SP (Korthikanti et al. 2022 §4.2.2) the row part all-gathers
    the output gradient (exposed), the column part re-gathers its sharded input behind the input-
    gradient GEMM and reduce-scatters the input gradient behind the weight-gradient GEMM; stacks
    other than the fused one keep the gathered input (``_activation``) and do not re-gather it.
    With ``tp_gemms`` (``CostOptions.tp_comm_overlap``) the output gradient's all-gather hides too,
    behind the row part's input-gradient GEMM, and each collective behind its own part's GEMMs.
    Hidden collectives still cost ``overlap_interference`` of their time."""
    if s.tp == 1:
        return 0.0
    perf, opts = ctx.perf, ctx.options
    tensor, group = tok * layer.hidden * _act_bytes(ctx), _group(ctx, 1, s.tp)
    col = wgrad * _column_share(layer) / (2 if layer.heads else 1)
    parts = _tp_parts(layer, s)
    f = opts.overlap_interference if opts.overlap_tp_backward else 1.0
    b = opts.overlap_comm_slowdown if opts.overlap_tp_backward else 1.0
    hide = col if opts.overlap_tp_backward else 0.0
    if s.sp:
        ag = perf.collective_time(Collective.ALL_GATHER, tok * layer.hidden * _gather_bytes(ctx), group)
        rs = perf.collective_time(Collective.REDUCE_SCATTER, tensor, group)
        fused = opts.elementwise == "fused"
        # only Megatron's fused stack re-gathers the column input in backward (the others keep it)
        regather = overlapped(ag, hide, f, b) if fused else 0.0
        plain = ag + regather + overlapped(rs, hide, f, b)
        if tp_gemms is not None:  # a part without GEMMs beside its collectives (MoE) runs as without
            return sum(hidden_behind(ag, row[1], opts) + (hidden_behind(ag, c[1], opts) if fused else 0.0)
                       + hidden_behind(rs, c[2], opts) if any(c) or any(row) else plain for c, row in tp_gemms)
        return parts * plain
    return parts * overlapped(perf.collective_time(Collective.ALL_REDUCE, tensor, group), hide, f, b)


def _column_share(layer: LayerSpec) -> float:
    """Fraction of a block's GEMM FLOPs in column-parallel GEMMs (QKV and FFN up/gate)."""
    if not layer.flops_per_token:
        return 0.0
    q, kv, h = layer.heads * layer.head_dim, layer.kv_heads * layer.head_dim, layer.hidden
    qkv, out = h * (q + 2 * kv), q * h
    mlp = layer.flops_per_token / 2 - qkv - out
    routed = layer.top_k + layer.shared_experts if layer.experts else 1
    down = layer.ffn_hidden * h * routed
    return max(0.0, qkv + mlp - down) / (layer.flops_per_token / 2)


def _recompute_flops(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, tok: float, mm: float) -> float:
    if s.recompute is Recompute.FULL:
        return mm + _attention_flops(ctx, layer, s, tok)
    if s.recompute is Recompute.SELECTIVE:
        policy = ctx.options.selective
        attention = _attention_flops(ctx, layer, s, tok) if policy != "torchtitan" else 0.0
        return attention + mm * _recomputed_gemm_share(layer, s, policy)
    return 0.0


def _block_gemm_shapes(layer: LayerSpec, s: LayerStrategy) -> list[tuple[float, float]]:
    """(input, output) widths per token of a block's GEMMs on one rank, in forward order: q, k, v,
    attention out (Llama/Megatron layout), then the MLP's up (gate and up when gated) and down per
    routed or shared expert a token visits (MoE: the router first). Column-parallel outputs are
    split over TP; row-parallel outputs (attention out, MLP down) are full ``h`` on every TP rank,
    partial sums before their reduction. A gated MLP is recognised by its FLOPs
    (:func:`strategies.cost.eager.up_projections`)."""
    h, t = layer.hidden, s.tp
    shapes: list[tuple[float, float]] = []
    if layer.heads:
        q, kv = layer.heads * layer.head_dim, layer.kv_heads * layer.head_dim
        shapes += [(h, q / t), (h, kv / t), (h, kv / t), (q / t, h)]
    if layer.ffn_hidden:
        routed = layer.top_k + layer.shared_experts if layer.experts else 1
        if layer.experts:
            shapes.append((h, layer.experts))
        ups = eager.up_projections(layer)
        for _ in range(routed):
            shapes += [(h, layer.ffn_hidden / t)] * ups + [(layer.ffn_hidden / t, h)]
    return shapes


def _recomputed_gemm_share(layer: LayerSpec, s: LayerStrategy, policy: str) -> float:
    """Fraction of the block's GEMM FLOPs a selective ``policy`` runs again in backward: torchtitan's
    op-level policy recomputes every second GEMM of the block; the others recompute none."""
    if policy != "torchtitan":
        return 0.0
    flops = [i * o for i, o in _block_gemm_shapes(layer, s)]
    return sum(flops[1::2]) / (sum(flops) or 1.0)


def _selective_redo(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, attn_fwd: float, ew: float,
                    t_mm: float) -> float:
    """Backward seconds spent recomputing under ``recompute: selective`` (``CostOptions.selective``):
    the attention core (Megatron); the attention core and the memory-bound elementwise kernels
    (galvatron's ``matmuls`` policy); the elementwise kernels and every second GEMM (torchtitan)."""
    policy = ctx.options.selective
    if policy == "megatron":
        return attn_fwd
    if policy == "matmuls":
        return attn_fwd + ew
    return ew + t_mm * _recomputed_gemm_share(layer, s, policy)


def _selective_kept(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy) -> float:
    """Bytes per token an op-level selective policy keeps: the layer's input (the checkpoint's
    argument, in the residual stream's width: :func:`stream_bytes`) and the outputs it saves.
    ``matmuls``: every GEMM output, and each TP collective's output (SP: two all-gathers of ``h``
    and two reduce-scatters of ``h/tp``; else two all-reduces of ``h``). ``torchtitan``: the 1st,
    3rd, ... GEMM outputs, the SDPA output (``q/tp``), and the SP reduce-scatters."""
    policy, h = ctx.options.selective, layer.hidden
    sp_div = s.tp if s.sp else 1
    outputs = [o for _, o in _block_gemm_shapes(layer, s)]
    if policy == "matmuls":
        kept = sum(outputs)
        if s.tp > 1:
            kept += 2 * h + 2 * h / s.tp if s.sp else 2 * h
    else:
        kept = sum(outputs[0::2]) + (layer.heads * layer.head_dim / s.tp if layer.heads else 0.0)
        if s.tp > 1 and s.sp:
            kept += 2 * h / s.tp
    return stream_bytes(ctx, layer, s)[0] * h / sp_div + _act_bytes(ctx) * kept


def _activation(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, mode: Recompute) -> float:
    """Bytes per token kept for backward on one rank (Korthikanti et al. 2022 Table 2): the norm and
    GEMM inputs ``8h`` (``4h`` without attention) are replicated over TP unless SP; the rest is split
    over TP; unfused attention adds ``5as`` (scores, softmax, dropout mask) unless selectively
    recomputed (``CostOptions.selective = "megatron"``); full recomputation keeps the layer input
    ``2h`` (``4h`` in an fp32 residual stream: :func:`stream_bytes`); the op-level selective
    policies keep what :func:`_selective_kept` counts. Eager stacks
    (``CostOptions.elementwise``) keep more: where autocast's norms compute in fp32 (16-bit plans over
    fp32 parameters, and LayerNorm on FSDP2's 16-bit ones: :func:`stream_bytes`) the two norm inputs
    are kept in fp32 (``+4h``), and autocast casts the attention's and a dense MLP's input once per
    linear that reads it (q, k and v, or one fused projection: ``LayerSpec.fused_qkv``; gate and up)
    and each keeps its copy (``+2h`` per extra reader, unless the stack casts each module's input once:
    ``CostOptions.cast_inputs_once``; benchmarks/results/saved_activations.md: 48.5 h
    kept per token where the one-copy count gave 44.0 h on one H100; under FSDP2 with RMSNorm, 38.3 h),
    and an unfused SwiGLU keeps SiLU's output too (``+2f``). Under SP only Megatron's fused stack
    re-gathers the GEMM inputs in backward; the others (DTensor's sequence parallelism) keep them
    gathered, ``1/tp`` of them only for the norm inputs."""
    scale = _act_bytes(ctx) / 2
    sp_div = s.tp if s.sp else 1
    if mode is Recompute.FULL:  # the block's input, in the residual stream's width
        return stream_bytes(ctx, layer, s)[0] * layer.hidden / sp_div
    if mode is Recompute.SELECTIVE and ctx.options.selective != "megatron":
        return min(_selective_kept(ctx, layer, s), _activation(ctx, layer, s, Recompute.NONE))
    h = layer.hidden
    inputs = (4 if layer.heads else 2) * h  # one 16-bit copy of the attention's and the MLP's input
    norms = inputs + (2 * h if ctx.options.dropout else 0)  # the norms' inputs (and dropout masks) as much
    sharded = layer.activation_bytes_per_token - 2 * inputs
    scores = 0.0
    if layer.heads and not ctx.options.flash_attention and mode is Recompute.NONE:
        scores = (5 if ctx.options.dropout else 4) * layer.heads * ctx.seq_len
    stack = ctx.options.elementwise
    up = eager.up_projections(layer) if layer.ffn_hidden and stack != "fused" else 1
    if stream_bytes(ctx, layer, s)[1] > _act_bytes(ctx):  # autocast's norms compute in fp32 (not in fp32 plans)
        norms += 4 * h  # both norms keep 4-byte inputs (the fp32 stream, or layer_norm's cast of a 16-bit one)
        readers = (eager.qkv_linears(layer) - 1 if layer.heads else 0) + (
            eager.input_readers(layer) - 1 if not layer.experts else 0)
        if not ctx.options.cast_inputs_once:  # else they share one 16-bit copy
            inputs += 2 * h * readers
    if stack != "fused" and layer.norm_composite and layer.activations_measured:
        # an RMSNorm written out in fp32 ops keeps one fp32 tensor per norm that the module's 16-bit
        # count halves: the fp32 copy of a 16-bit input, or over an fp32 stream the normalised product
        # before the weight (HF Llama 3.2 1B on one H100: 2.3 GiB over 16 blocks, 4.5h per token)
        norms += 4 * h
    if stack != "fused" and not layer.activations_measured:  # else counted on the module's ops
        if up == 2:
            # eager silu(gate) * up keeps silu's output for the product's backward besides gate and up
            sharded += 2 * layer.ffn_hidden * (layer.top_k + layer.shared_experts if layer.experts else 1)
        if mode is Recompute.NONE:
            sharded += _expanded_kv(layer)
    if layer.experts and expert_gemm_dtype(ctx, layer) != ctx.dtype.value:
        # the fused experts' tensors (spec_module._add_fused_experts' 16-bit count) are kept in fp32
        sharded += layer.top_k * (2 * h + 6 * layer.ffn_hidden)
    inputs_div = sp_div if stack == "fused" else 1
    kept = scale * (norms / sp_div + inputs / inputs_div + (max(sharded, 0.0) + scores) / s.tp)
    if ctx.dtype is DType.FP8 and layer.heads and layer.ffn_hidden:  # TE keeps its GEMM inputs in FP8
        routed = layer.top_k + layer.shared_experts if layer.experts else 0
        kept += fp8.saved_bytes_delta(h, layer.heads * layer.head_dim, layer.ffn_hidden, s.tp,
                                      s.sp and stack == "fused", 1 if layer.experts else 2, routed, routed or 1)
    return kept


def _expanded_kv(layer: LayerSpec) -> float:
    """Bytes per token (16-bit) that eager GQA attention keeps beyond GQA-sized K and V: ``repeat_kv``
    (torchtitan) or ``repeat_interleave`` (the reference GPT, Hugging Face's eager and SDPA paths
    with a mask) copies K and V to every query head and the attention kernel saves the copies for
    its backward, while the un-expanded K (after the rotation) and V are freed: ``2 (q - kv)`` each.
    A fused stack's kernels take GQA as it is. Llama 3 8B at sequence 8192 keeps 3 GiB more over
    its 32 blocks (benchmarks/results/plan_memory: the traced step's live tensors at its peak)."""
    if not layer.kv_heads or layer.kv_heads >= layer.heads:
        return 0.0
    return 2 * 2 * (layer.heads - layer.kv_heads) * layer.head_dim


# ------------------------------------------------------------------ ZeRO and optimizer
@dataclass(frozen=True)
class ZeroTerms:
    """A layer's parameter/gradient/optimizer part under one strategy: per-rank bytes, per-step
    times, and the per-micro-batch ZeRO-2/3 collectives (``rs``, ``ag``) before overlap."""

    params: float = 0.0
    grads: float = 0.0
    optim_states: float = 0.0
    sync: float = 0.0
    post: float = 0.0
    optim: float = 0.0
    rs: float = 0.0
    ag: float = 0.0
    ag_fwd: float = 0.0
    """FSDP2's ZeRO-2 all-gather before each micro-batch's forward (its parameters are resharded after
    each backward; ``CostOptions.master_weights = "params"``): forward only, unlike ZeRO-3's ``ag``."""
    work: float = 0.0
    copies: float = 0.0
    """FSDP2's unsharded ZeRO-2 parameters (``CostOptions.master_weights = "params"``), held from a
    micro-batch's forward to its backward: counted with the activations."""
    casts: float = 0.0
    """Autocast's 16-bit casts of fp32 parameters (ZeRO-0/1 under a 16-bit dtype, ``master_weights =
    "params"``), held from a micro-batch's forward to its backward unless the block casts them again
    when it recomputes (:func:`recasts`): counted with the activations."""
    param_fwd: float = 0.0
    """Per-micro-batch seconds of an eager stack's per-parameter kernels in the forward (autocast's
    weight casts, FSDP2's copy-out of all-gathered parameters: :func:`strategies.cost.eager.param_traffic`),
    compute time of the layer; 0 for fused stacks and for layers a profile measured."""
    param_bwd: float = 0.0
    """The same in the backward: gradient casts, FSDP2's reduce-scatter copy-in, and the adds of
    gradient accumulation over micro-batches where the weight-gradient GEMMs do not accumulate."""

    def held(self, recast: bool) -> float:
        """Bytes of parameter copies held from a micro-batch's forward to its backward, counted with the
        activations: FSDP2's ``copies``, and autocast's ``casts`` unless the block casts again
        (``recast``, :func:`recasts`)."""
        return self.copies + (0.0 if recast else self.casts)


def zero_terms(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy) -> ZeroTerms:
    """Parameter/gradient/optimizer memory, per-step sync, per-micro-batch ZeRO-2/3 traffic and the
    optimizer step for the layer's parameters (ZeRO paper §3.1 and §7). Dense parameters are
    replicated over the ``dp * cp`` ranks ``tp`` apart; routed experts over Megatron-Core's
    expert-data-parallel group of ``dp * tp * cp / (etp * ep)`` ranks ``etp * ep`` apart
    (:func:`expert_groups`; ``dp * cp / ep`` ranks ``tp * ep`` apart when ``etp`` is ``tp``)."""
    dense, expert = _dense_expert_params(layer, s)
    opts = ctx.options
    te_fp8 = ctx.dtype is DType.FP8 and layer.kind in BLOCK_KINDS  # Transformer Engine's FP8 linears
    pb, gb = 1 if te_fp8 and opts.fp8_params else _param_bytes(ctx), opts.grad_bytes
    ob = 8 if ctx.dtype is DType.FP32 or ctx.options.master_weights == "params" else 12
    acc = dict.fromkeys((f.name for f in fields(ZeroTerms)), 0.0)
    uncast = expert_gemm_dtype(ctx, layer) != ctx.dtype.value  # experts outside autocast: never cast
    for params, group, cast in ((dense, _group(ctx, s.tp, s.dp * s.cp), True),
                                (expert, expert_groups(ctx, s)[2], not uncast)):
        if params:
            _zero_part(ctx, s, acc, params, group, (pb, gb, ob), cast)
    if layer.kind in (LayerKind.EMBEDDING, LayerKind.HEAD):
        acc["casts"] = _edge_casts(ctx, layer, s, pb)
    acc["param_fwd"], acc["param_bwd"] = _param_kernels(ctx, layer, s, dense + expert, dense if uncast else None)
    if te_fp8:  # FP8 weight copies, made at each step's first micro-batch (strategies.cost.fp8)
        # held all step beside the 16-bit parameters; under ZeRO-3 only beside the layer's gathered ones
        acc["params" if replica_zero(s) < 3 else "work"] += fp8.weight_copy_bytes(dense + expert, opts.fp8_params)
        acc["post"] += ctx.perf.memory_time(fp8.weight_quantize_bytes(dense + expert, opts.fp8_scaling,
                                                                      opts.fp8_params))
    if layer.experts_sliced and _measured(ctx, layer, s) is None:
        slices, full = _sliced_expert_grads(ctx, layer, s)
        acc["param_bwd"] += getattr(ctx.perf, "streaming_time", ctx.perf.memory_time)(slices)
        acc["work"] = max(acc["work"], full)
    return ZeroTerms(**acc)


def _sliced_expert_grads(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy) -> tuple[float, float]:
    """Bytes one backward moves, and the most it holds at once, for experts whose 3-D weights an eager
    loop indexes (``LayerSpec.experts_sliced``): per expert, ``select_backward`` writes a zero-filled
    tensor of the whole weight and copies the slice's gradient in (read and write the slice), and
    autograd adds it to the sum of the ones before (read two, write one), in the parameters' dtype (16
    bits where the stack hands the experts 16-bit copies: ``CostOptions.cast_fused_experts``). At
    once: the running sum and the new tensor of the largest weight, a gated expert's up projection
    (2/3 of its weights)."""
    local = max(layer.experts // s.ep, 1)
    weights = _dense_expert_params(layer, s)[1] * (4 if _fused_experts_see_fp32(ctx) else 2)
    return weights * (local + 2 + 3 * (local - 1)), 2 * weights * 2 / 3


def _edge_casts(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, pb: int) -> float:
    """Autocast's 16-bit weight casts at the edges: the embedding's lookup reads its fp32 weight as it
    is (``embedding`` is not on autocast's list), while the head's GEMM casts the weight it reads,
    its own or, tied, the embedding's (whose parameters the spec counts once, at the embedding):
    ``vocab x h`` per TP rank, held from the forward to the backward like a block's (ZeRO-0/1 over
    fp32 parameters). Llama 3.2 1B untied, one H100's step traced: the embedding's cast was 0.49
    GiB too many (+1.5-1.8%)."""
    if (layer.kind is not LayerKind.HEAD or ctx.options.master_weights != "params" or ctx.dtype is DType.FP32
            or replica_zero(s) >= 2):
        return 0.0
    return pb * layer.flops_per_token / 2 / s.tp


def _param_kernels(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy, params: float,
                   cast: float | None = None) -> tuple[float, float]:
    """Forward and backward seconds of an eager stack's kernels over the rank's copy of the weights
    of a block or the head (the embedding's lookup and the norm run on their weights as they are).
    They depend on the ZeRO stage, so they belong to the ZeRO part, which the search keys by it; a
    fully recomputed block's second forward casts again, which is not charged. Which kernels a stack
    runs is :func:`strategies.cost.eager.param_traffic`'s (a fused stack: ZeRO-3's copies only), plus
    the gradient-accumulation adds of a stack whose weight-gradient GEMMs do not accumulate
    (:func:`_accumulate_traffic`). ``cast``: the parameters the stack's per-parameter kernels touch
    where not all (experts that run outside autocast are never cast); the accumulation adds all."""
    if layer.kind in (LayerKind.EMBEDDING, LayerKind.NORM):
        return 0.0, 0.0
    if _measured(ctx, layer, s) is not None:
        return 0.0, 0.0  # a profile's layer time includes them
    fwd, bwd = _traffic_times(ctx, _param_traffic(ctx, s, params if cast is None else cast))
    zero = replica_zero(s)
    adds = _accumulate_traffic(ctx, zero, ctx.options.master_weights == "params").scaled(params)
    streaming = getattr(ctx.perf, "streaming_time", ctx.perf.memory_time)  # a measured profile has none
    return fwd, bwd + (streaming(adds.bwd) if adds.bwd else 0.0)


def _zero_part(ctx: LayerContext, s: LayerStrategy, acc: dict[str, float], params: float, group: Group,
               sizes: tuple[int, int, int], cast: bool = True) -> None:
    perf, opts = ctx.perf, ctx.options
    pb, gb, ob = sizes
    d = group.size
    z = s.zero if d > 1 else 0
    shard = params / d if z >= 1 else params
    if opts.master_weights == "params":
        # fp32 parameters, sharded by FSDP2 from ZeRO-2 on; the copies the forward computes with live
        # until the backward: autocast's 16-bit casts (ZeRO-0/1 under a 16-bit dtype) and FSDP2's
        # unsharded ZeRO-2 parameters (16-bit or, under fp32, a second fp32 copy beside the shard)
        # FSDP2's CPU offload keeps the fp32 shards and their gradients in host memory too (each
        # unit's shard is copied in for its all-gather and its reduce-scattered gradient out)
        host = s.offload and z >= 2
        acc["params"] += 0.0 if host else 4 * (params / d if z >= 2 else params)
        acc["copies"] += pb * params if z == 2 else 0.0
        acc["casts"] += pb * params if z <= 1 and cast and ctx.dtype is not DType.FP32 else 0.0
    else:
        host = False
        acc["params"] += pb * (params / d if z >= 3 else params)
    acc["grads"] += 0.0 if host else gb * (params / d if z >= 2 else params)
    acc["optim_states"] += 0.0 if s.offload else ob * shard
    grads, gathered = params * gb, params * pb
    if z == 0:
        acc["sync"] += perf.collective_time(Collective.ALL_REDUCE, grads, group)
    elif z == 1:
        reduce = Collective.ALL_REDUCE if opts.zero1_reduce == "all_reduce" else Collective.REDUCE_SCATTER
        acc["sync"] += perf.collective_time(reduce, grads, group)
    if z <= 1 and d > 1 and opts.bucket_copies:
        master = 4 if opts.master_weights == "params" else pb  # the parameters' own dtype
        copies = 4 * gb * params + (2 * master * (shard + params) if z == 1 else 0.0)
        acc["post"] += perf.memory_time(copies)
    if z == 1 and not opts.overlap_param_gather:
        # the updated slices in the parameters' own dtype: fp32 where they are the master weights
        acc["post"] += perf.collective_time(Collective.ALL_GATHER, 4 * params if opts.master_weights == "params"
                                            else gathered, group)
    elif z == 2 and opts.master_weights == "params":
        # FSDP2 reshards after each backward and gathers again before the next micro-batch's forward
        acc["ag_fwd"] += perf.collective_time(Collective.ALL_GATHER, gathered, group)
    elif z in (1, 2):
        # hidden behind the next forward, but not free: it takes its share of the compute beside it
        acc["post"] += opts.overlap_interference * perf.collective_time(Collective.ALL_GATHER, gathered, group)
    if z >= 2:
        # ZeRO-2 reduce-scatters gradients every micro-batch; ZeRO-3 also gathers parameters before
        # forward and backward (and holds a gathered copy for the backward and the next layer's prefetch)
        acc["rs"] += perf.collective_time(Collective.REDUCE_SCATTER, grads, group)
    if z == 3:
        acc["ag"] += perf.collective_time(Collective.ALL_GATHER, gathered, group)
        acc["work"] += 2 * gathered
    acc["optim"] += _optimizer_time(ctx, s, shard, pb, gb)


def zero_exposed(ag: Any, rs: Any, fwd: Any, bwd_compute: Any, options: CostOptions,
                 ag_fwd: Any = 0.0) -> tuple[Any, Any]:
    """Exposed forward and backward seconds of the per-micro-batch ZeRO collectives (``ag_fwd``: gathers
    in the forward only, :attr:`ZeroTerms.ag_fwd`): prefetching hides them behind the pass's compute
    (at ``overlap_interference`` of their time). Works on floats and on numpy arrays (the search)."""
    if not options.overlap_zero_prefetch:
        return ag + ag_fwd, ag + rs
    return hidden_behind(ag + ag_fwd, fwd, options), hidden_behind(ag + rs, bwd_compute, options)


def recasts(ctx: LayerContext, layer: LayerSpec, mode: Recompute) -> bool:
    """Whether a block at recompute ``mode`` frees the forward's autocast weight casts
    (:attr:`ZeroTerms.casts`) before its backward: a cast is held only while autograd saves it for
    a GEMM's backward or autocast's cache (cleared when the forward's autocast region exits) holds
    it. A fully recomputed block saves only its input, an op-level selective policy only GEMM and
    collective outputs (a cast is neither), and the backward casts again; Megatron's attention-core
    recomputation keeps the projections' saved casts. Embedding, norm and head are never
    recomputed. benchmarks/results/fake_memory: at their peaks the traced steps of Llama 3.2 1B on one
    GPU (selective mb 2, full mb 4) and of the dp2 tp4+sp Llama 3 8B plan (selective) hold no block
    weight casts, the steps without recomputation hold all."""
    if layer.kind not in BLOCK_KINDS:
        return False
    return mode is Recompute.FULL or (mode is Recompute.SELECTIVE and ctx.options.selective != "megatron")


def apply_zero(c: LayerCost, z: ZeroTerms, options: CostOptions, recast: bool = False) -> None:
    """Add the ZeRO/optimizer part ``z`` to a :func:`core_cost` result; ``recast``: the layer holds
    no autocast casts (:func:`recasts`)."""
    c.fwd, c.bwd, c.bwd_compute = c.fwd + z.param_fwd, c.bwd + z.param_bwd, c.bwd_compute + z.param_bwd
    fwd_x, bwd_x = zero_exposed(z.ag, z.rs, c.fwd, c.bwd_compute, options, z.ag_fwd)
    fwd_x, bwd_x = float(fwd_x), float(bwd_x)
    c.fwd += fwd_x
    c.bwd += bwd_x
    if z.rs or z.ag or z.ag_fwd:
        c.comm["zero"] = c.comm.get("zero", 0.0) + fwd_x + bwd_x
    c.work = max(c.work, z.work)
    c.params += z.params
    c.grads += z.grads
    c.optim_states += z.optim_states
    c.act += z.held(recast)
    c.sync += z.sync
    c.post += z.post
    c.optim += z.optim


def _optimizer_time(ctx: LayerContext, s: LayerStrategy, shard: float, pb: int, gb: int) -> float:
    """The optimizer step is memory-bound (Megatron's DistributedOptimizer / FSDP2 + AdamW): Adam reads
    the fp32 master weight, both moments and the gradient and writes the three back (``24 + g``
    bytes per parameter); the master weight is copied to the compute copy (``4 + p``); the gradient
    norm reads the gradients, clipping scales them in place and the next step zeroes them (``4g``):
    ``28 + 5g + p`` bytes, 50 with fp32 gradients and 16-bit weights. With fp32 parameters as the
    master weights (``CostOptions.master_weights = "params"``: PyTorch's fused AdamW on the
    parameters, gradients freed by ``zero_grad(set_to_none=True)``) only Adam's ``24 + g`` bytes;
    a script that clips gradients adds ``3g`` (norm, then scale in place), not counted. Offloaded:
    CPU Adam plus gradient and parameter copies over PCIe."""
    if s.offload:
        return shard / ctx.options.cpu_adam_params_per_s + ctx.perf.host_time(shard * (gb + pb))
    measured = getattr(ctx.perf, "optimizer_step_time", None)  # a profile's timed optimizer step
    if measured is not None and (seconds := measured(shard)) is not None:
        return seconds
    if ctx.options.master_weights == "params":
        return ctx.perf.memory_time(shard * (24 + gb))
    return ctx.perf.memory_time(shard * (28 + 5 * gb + pb))


# ------------------------------------------------------------------ embedding, norm, head
def _embedding(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy) -> LayerCost:
    """Vocabulary-parallel lookup: one all-reduce (reduce-scatter with SP) of the output over TP."""
    c = LayerCost()
    tok = tokens_per_rank(ctx, s)
    tensor = tok * layer.hidden * _act_bytes(ctx)
    c.fwd = ctx.perf.memory_time(3 * tensor)
    c.bwd = c.bwd_compute = ctx.perf.memory_time(3 * tensor)
    measured = _measured(ctx, layer, s)
    if measured is not None:
        c.fwd, c.bwd = measured.forward, measured.backward
        c.bwd_compute = c.wgrad = measured.backward
        _host_times(c, measured)
    if s.tp > 1:
        op = Collective.REDUCE_SCATTER if s.sp else Collective.ALL_REDUCE
        tp = ctx.perf.collective_time(op, tensor, _group(ctx, 1, s.tp))
        c.fwd += tp
        c.comm["tp"] = tp
    return c


def _norm(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy) -> LayerCost:
    c = LayerCost()
    tok = tokens_per_rank(ctx, s) / (s.tp if s.sp else 1)
    c.fwd = ctx.perf.memory_time(4 * layer.hidden * tok)
    c.bwd = c.bwd_compute = 2 * c.fwd
    c.work = layer.activation_bytes_per_token * tok
    return c


def _head(ctx: LayerContext, layer: LayerSpec, s: LayerStrategy) -> LayerCost:
    """Output GEMM split over the vocabulary and the fp32 cross-entropy over logits (fused: read/write
    12 bytes per logit forward, as much backward; eager: :func:`strategies.cost.eager.loss_traffic`,
    with the weight's casts or copies); with SP the input is all-gathered first. A head
    without a known width (``hidden`` 0) is costed by its FLOPs alone, with no logits. The loss's
    transient peak is ``CostOptions.loss_bytes_per_logit`` per logit on the rank
    (``vocab_parallel_loss_bytes_per_logit`` where the vocabulary is split over TP ranks)."""
    c = LayerCost()
    tok = tokens_per_rank(ctx, s)
    mm = layer.flops_per_token * tok / s.tp
    vocab = layer.flops_per_token / (2 * layer.hidden) if layer.hidden else 0.0
    gemms: list[Gemm] = [(tok, vocab / s.tp, layer.hidden, 1)] if vocab else []
    t_mm, dgrad, wgrad = _gemm_times(ctx, gemms, mm, dtype=_sixteen_bit(ctx))
    loss = eager.loss_traffic(ctx.options.elementwise).scaled(vocab * tok / s.tp)
    loss_fwd, loss_bwd = _traffic_times(ctx, loss)
    tp = 0.0
    if s.tp > 1:
        op = Collective.ALL_GATHER if s.sp else Collective.ALL_REDUCE
        tp = ctx.perf.collective_time(op, tok * layer.hidden * _act_bytes(ctx), _group(ctx, 1, s.tp))
    fwd_compute, bwd_compute = t_mm + loss_fwd, dgrad + wgrad + loss_bwd
    measured = _measured(ctx, layer, s)  # a profile's head: final norm, output GEMM and loss
    if measured is not None:
        wgrad *= measured.backward / (bwd_compute or 1.0)
        fwd_compute, bwd_compute = measured.forward, measured.backward
        _host_times(c, measured)
    c.fwd = fwd_compute + (tp if s.sp else 0.0)
    c.wgrad = wgrad
    c.bwd_compute = bwd_compute
    c.bwd = c.bwd_compute + tp
    c.flops = 3 * mm
    c.comm["tp"] = tp * (2 if s.sp else 1)
    # logits live from the loss to the head's backward only, which follow each other: transient
    loss_bytes = ctx.options.loss_bytes_per_logit
    if s.tp > 1 and ctx.options.vocab_parallel_loss_bytes_per_logit is not None:
        loss_bytes = ctx.options.vocab_parallel_loss_bytes_per_logit
    c.work = (2 * layer.hidden / (s.tp if s.sp else 1) + loss_bytes * vocab / s.tp) * tok
    return c


def tied_copy(ctx: LayerContext, spec: ModelSpec, s: LayerStrategy, holder: bool) -> LayerCost:
    """Tied input/output embeddings under pipeline parallelism (Megatron's shared word embeddings):
    the last stage keeps its own copy of the embedding weights (parameters, gradients, optimizer
    states and step when ``holder``), and both ends all-reduce the copies' gradients once per step
    after the backward pass, exposed, over a group of 2 (across nodes when a stage fills a node)."""
    c = LayerCost()
    embeddings = spec.layers_of(LayerKind.EMBEDDING)
    if not (spec.tied_embeddings and embeddings):
        return c
    layer = embeddings[0]
    if holder:
        z = zero_terms(ctx, layer, s)
        c.params, c.grads, c.optim_states, c.optim = z.params, z.grads, z.optim_states, z.optim
        c.act = z.held(recast=False)
    grads = layer.params / s.tp * ctx.options.grad_bytes
    inter = ctx.stage_devices >= ctx.perf.gpus_per_node
    c.post = ctx.perf.collective_time(Collective.ALL_REDUCE, grads, Group(size=2, per_node=1 if inter else 2))
    return c


def tied_gradient_sum(ctx: LayerContext, spec: ModelSpec, s: LayerStrategy) -> LayerCost:
    """Tied input/output embeddings on one stage: the head's gradient of the shared weight comes
    first, and the embedding's backward, the backward's last op, computes a whole second one
    (``embedding_dense_backward``, in the weight's dtype, the rank's vocabulary shard) before autograd
    sums it in place into the first: a transient on top of every gradient (``grad_work``). Not where
    FSDP2 holds the weight (ZeRO-2/3 over more than one replica), whose gradients are reduced as they
    come. benchmarks/results/fidelity_memory: Llama 3.2 1B at one sample with full recomputation
    peaks there, 0.98 GiB over its gradients."""
    c = LayerCost()
    embeddings = spec.layers_of(LayerKind.EMBEDDING)
    if not (spec.tied_embeddings and embeddings) or fsdp_unit(s):
        return c
    fp32 = ctx.dtype is DType.FP32 or ctx.options.master_weights == "params"
    c.grad_work = embeddings[0].params / s.tp * (4 if fp32 else _param_bytes(ctx))
    return c
