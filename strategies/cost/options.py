"""Software-stack facts the cost model cannot read from a plan, a model or a datasheet."""

from __future__ import annotations

from dataclasses import dataclass

from galvatron.strategies.cost.fp8 import FP8_SCALINGS


@dataclass(frozen=True, kw_only=True)
class CostOptions:
    """What the training stack does besides the plan. The defaults describe a tuned PyTorch stack:
    fused memory-bound kernels (torch.compile, or Megatron's fused kernels), fp32 parameters under
    mixed precision, the native runtime's selective policy and Megatron's fused cross-entropy.
    ``galvatron.backends.capabilities(name).cost_options()`` gives each backend's own (the native
    runtime's eager autocast, Megatron-Core's, DeepSpeed's), which ``wrap(plan="auto")``, the
    launcher and ``galvatron search --backend`` use; the fidelity benchmarks set what each
    published run used."""

    flash_attention: bool = True
    """Fused attention (no s x s scores in memory). False: unfused QK^T, softmax, dropout, AV kernels
    as in Megatron-LM 2021-22 (Korthikanti et al. 2022 Eq. 1 keeps 5as bytes per token)."""
    attention_kernel: str | None = None
    """The fused attention kernel the stack runs (a key of the GPU's ``attention_kernels`` in the
    hardware database: ``cudnn``, ``flash2``, ``flash3``...). None: the GPU's default, what PyTorch's
    ``scaled_dot_product_attention`` picks there today (cuDNN on Hopper from torch 2.10; before,
    FlashAttention-2 at about half its rate)."""
    dropout: bool = False
    """Dropout after attention and MLP (GPT-3 style): masks kept for backward (Korthikanti Table 2)."""
    persistent_grads: bool | None = None
    """Gradients stay allocated for the whole step (Megatron-Core's contiguous gradient buffers,
    DeepSpeed's partitions). False: they exist only from the backward to the optimizer step, as
    PyTorch's ``zero_grad(set_to_none=True)`` leaves them (galvatron's native runtime, torchtitan),
    so they overlap the activations only as the backward trades one for the other. None: persistent
    exactly when a step accumulates more than one micro-batch (the first one's gradients then wait
    through the others' forward passes)."""
    overlap_grad_reduce: bool = True
    """Data-parallel gradient reduction overlapped with the last micro-batch's backward."""
    overlap_param_gather: bool = True
    """ZeRO-1's parameter all-gather after the optimizer overlapped with the next forward (Megatron's
    ``--overlap-param-gather``). False: the step waits for it (galvatron's native ZeRO-1 gathers the
    updated slices inside ``optimizer.step()``). ZeRO-2's gather (FSDP2 unsharding the parameters
    before the next forward, prefetched) is always taken as hidden. A hidden gather still costs
    ``overlap_interference`` of its time."""
    blocking_p2p: bool = False
    """Pipeline sends and receives block the process on both ends (gloo on CPU workers: a send
    returns once the peer has the data, a receive waits for the peer to be scheduled), so every stage
    pays each handoff, not only the sender's side as with NCCL's asynchronous p2p, whose waits the
    schedule's bubbles already hold. The receiving stage's handoffs are priced at its own input's
    size (the search keeps stages independent)."""
    overlap_p2p: bool = False
    """An interleaved schedule's sends and receives run beside the next chunk's compute instead of
    before it (Megatron-Core's ``overlap_p2p_comm``: off in its ``ModelParallelConfig``, on in
    Megatron-LM's training script for interleaved schedules unless ``--no-overlap-p2p-communication``,
    and in NeMo's and Megatron-Bridge's recipes; Megatron-LM of 2022 and torch's
    ``ScheduleInterleaved1F1B`` wait for them): a chunk's
    handoff then costs what :func:`strategies.cost.step.overlapped` charges beside the chunk's forward
    and backward. Other schedules are unaffected (Megatron refuses the overlap without interleaving)."""
    pipeline_action_s: float = 0.0
    """Host seconds the pipeline schedule spends per action, one chunk's forward or backward of one
    micro-batch, besides its kernels and handoffs (``torch.distributed.pipelining``'s Python: the
    action's dispatch, its send/receive set-up, the loss wrapper), charged serially to every chunk
    pass of a plan with ``pp > 1``, twice per chunk and micro-batch. 0: not modelled (GPUs, whose
    host runs ahead of the device unless passes are tiny). CPU workers measure it in their gloo
    profile (``profiler.schema.ClusterProfile.pipeline_action_s``): about 1-2.5 ms with 4 workers on
    2 cores (benchmarks/results/cpu_plans.md)."""
    bucket_copies: bool = False
    """Local copies around ZeRO-0/1's gradient sync, once per step, exposed after the backward:
    each bucket's gradients copied into a flat buffer before its all-reduce and averaged in place
    after (read and write ``grad_bytes`` per parameter, twice), and ZeRO-1's updated slices gathered
    through a flat buffer and copied back into the parameters (read and write the parameters' bytes
    per parameter of the slice, then per parameter). galvatron's native runtime
    (``runtime.data.GradientSync``, ``runtime.optim``: 70 ms of ``cat``, ``div_`` and ``copy_`` per
    step for Llama 2 7B at dp2 ZeRO-1 on one H200, benchmarks/results/multi_gpu/plans_llama2-7b_fake2.json);
    False: a stack whose gradients accumulate into the communication buffer (Megatron's contiguous
    grad buffer, DDP's bucket views)."""
    zero1_reduce: str = "reduce_scatter"
    """The collective that syncs ZeRO-1's gradients (:data:`ZERO1_REDUCES`). ``reduce_scatter``: each
    rank receives the gradient slice it updates (Megatron's distributed optimizer, ZeRO paper §5.1).
    ``all_reduce``: every rank receives every gradient, twice the traffic (galvatron's native
    runtime, whose buckets all-reduce whatever the ZeRO stage, and then update their slice)."""
    overlap_tp_backward: bool = True
    """Tensor-parallel input-gradient collectives overlapped with weight-gradient GEMMs (Megatron's
    asynchronous grad all-reduce, Korthikanti et al. 2022 §6.2)."""
    tp_comm_overlap: bool = False
    """Tensor-parallel collectives under sequence parallelism overlapped with the GEMMs beside them
    (Transformer Engine's userbuffers, Megatron's ``--tp-comm-overlap``): each all-gather with the
    column-parallel GEMM that reads it and each reduce-scatter with the row-parallel GEMM that writes
    it; in the backward the output gradient's all-gather with the row-parallel input-gradient GEMM,
    the input's re-gather with the column-parallel one and the input gradient's reduce-scatter with
    its weight-gradient GEMM. Each pair is priced by :func:`strategies.cost.step.overlapped` (hidden
    collectives still cost ``overlap_interference`` of their time); the stack's own costs of
    overlapping (GEMMs split into row chunks, 1.07x the whole GEMM's time at the median on an H100:
    benchmarks/results/gemm_chunks.json; SMs held back for the collectives) are not: NVIDIA's DGX Cloud
    recipes on H100 come out 6.7% optimistic on average with it, 0.0% without (docs/simulation.md). False:
    Megatron's default, where only the backward's collectives overlap (``overlap_tp_backward``)."""
    fp8_scaling: str = "delayed"
    """How an ``fp8`` plan picks its scaling factors (:data:`strategies.cost.fp8.FP8_SCALINGS`):
    ``delayed`` from the maxima of earlier steps (Transformer Engine's ``DelayedScaling``, NeMo's
    recipes of 2024), ``current`` from each tensor's own maximum, read first (``Float8CurrentScaling``,
    Megatron-Bridge's ``tensorwise`` recipe of 2025): 2 bytes more per element quantized."""
    fp8_params: bool = False
    """An ``fp8`` plan keeps its blocks' weights in FP8 (Megatron's ``--fp8-param-gather``): the
    optimizer writes them as it updates them, ZeRO's parameter all-gather moves 1 byte per parameter,
    and the first micro-batch only transposes them (``strategies.cost.fp8``)."""
    overlap_zero_prefetch: bool = True
    """ZeRO-3 parameter all-gathers and gradient reduce-scatters prefetched behind compute."""
    overlap_interference: float = 0.2
    """Fraction of compute throughput a collective takes while it overlaps compute: NCCL runs one CTA
    per channel on the SMs (24 CTAs for an all-gather on an H100, 18% of its 132 SMs: NVIDIA developer
    forum thread 337991, 2025; ~22% of an A100's 108), so hidden communication is not free."""
    overlap_comm_slowdown: float = 1.0
    """How many times longer a collective hidden behind compute takes than alone (the gradient sync
    behind the backward, ZeRO's prefetches, TP's backward collectives, ring and expert exchanges:
    ``step.overlapped``). 1: as alone, without a cluster profile; a profile measures it
    (``galvatron.profiler.schema.Overlap.comm_slowdown``): 1.5 for NCCL on two H200, 1.7-3.7 for 4 gloo
    workers sharing 2 cores."""
    moe_imbalance: float | None = None
    """Tokens on the busiest expert-parallel rank over the mean. None: the expected maximum under
    uniformly random top-k routing (balls into bins, Gaussian tail: ``1 + sqrt(2 ln ep) *
    sqrt((1 - 1/ep) / n)`` for ``n`` routed tokens per rank; Raab & Steger 1998), a lower bound;
    learned routers with an auxiliary loss run 1.1-1.5x (set it from a measurement)."""
    moe_capacity_factor: float | None = None
    """Expert capacity over the mean load (GShard/Switch capacity mode): tokens beyond it are dropped,
    so the busiest rank computes at most this factor. None: dropless (the imbalance applies in full)."""
    moe_grouped_gemm: bool = True
    """Routed experts run as one grouped GEMM per projection over the rank's experts (Megatron-Core
    ``--moe-grouped-gemm`` / TE grouped linear, torchtitan ``grouped_mm``). False: one GEMM kernel per
    local expert in a loop (Megatron-Core SequentialMLP, Hugging Face eager experts), each paying its
    own launch and its own last partial wave."""
    moe_shared_expert_overlap: bool = False
    """Shared experts run beside the dispatch/combine all-to-all (Megatron-Core
    ``--moe-shared-expert-overlap``: shared-expert GEMMs on a side stream), which then hides behind
    their forward and backward GEMMs; off by default, as in Megatron-Core."""
    loss_bytes_per_logit: float = 6.0
    """Bytes per logit on the rank at the loss's peak. 6: Megatron's fused vocab-parallel cross-entropy
    (the 16-bit logits and their fp32 copy, turned into the softmax and then the gradient in place).
    12: eager PyTorch ``F.cross_entropy(logits.float(), y)`` (torchtitan, Hugging Face): in backward the
    saved fp32 log-softmax, the incoming fp32 gradient and the fp32 input gradient are live at once."""
    vocab_parallel_loss_bytes_per_logit: float | None = None
    """The same where the head splits the vocabulary over TP ranks (None: ``loss_bytes_per_logit``).
    16: eager ``F.cross_entropy`` on DTensor's ``loss_parallel`` (the shifted logits, their exponent,
    the gradient's zeros and its sum, all fp32, at the backward's peak: the traced steps of
    benchmarks/results/fake_memory, ``plan-*``)."""
    elementwise: str = "fused"
    """How the stack runs the memory-bound ops around the GEMMs (:data:`ELEMENTWISE_STACKS`).
    ``fused``: Megatron-LM's fused kernels or ``torch.compile``: each norm, activation and residual
    reads and writes its tensors about once (``strategies.cost.layer._ELEMENTWISE_PER_H``).
    ``eager``: eager PyTorch with 16-bit parameters and activations (FSDP2 ``MixedPrecisionPolicy``,
    torchtitan without compile); ``autocast``: eager PyTorch under ``torch.autocast`` over fp32
    parameters (galvatron's native runtime, the reference GPT), with an fp32 residual stream and
    casts before every GEMM. Eager stacks pay one kernel per ATen op, each reading its inputs and
    writing its output, op by op as ``strategies.cost.eager`` lists them."""
    wgrad_fp32_accumulation: bool | None = None
    """Weight-gradient GEMMs add into the fp32 gradient (Megatron's ``gradient_accumulation_fusion``,
    Transformer Engine's ``fuse_wgrad_accumulation``): they read and write it (``DatasheetPerf.gemm_time``
    ``accumulate``). False: they write a 16-bit gradient the stack then casts or adds (eager PyTorch,
    FSDP2, ``torch.compile``). None: True exactly on the ``fused`` stack (Megatron's kernels)."""
    host_us_per_kernel: float = 0.0
    """Host microseconds to issue one kernel of an eager stack (Python, dispatcher, autograd, launch):
    a pass then lasts as long as the slower of the device and the host issuing its kernels
    (``strategies.cost.step.device_or_host``), which small micro-batches hit. 0: the host is never
    the bottleneck (the datasheet model's default; a profile measures host time itself). Measured:
    33 us (the 1.4B reference GPT eager under autocast at one sample per step on one H100 and its
    host: 80.2 ms per step for 2400 kernels while the device was busy 65.9 ms;
    benchmarks/results/step_breakdown_small.json); the native and DeepSpeed backends declare it."""
    sequence_parallel_copies: bool = True
    """Sequence parallelism on an eager stack copies every collective's tensor whole: DTensor's
    ``Shard(1)`` over batch-first ``[batch, seq, hidden]`` activations (torchtitan's
    ``SequenceParallel``) gathers and scatters dimension 1 through collectives on dimension 0, so each
    all-gather's output and reduce-scatter's input is chunked and concatenated
    (``strategies.cost.eager.sequence_parallel_copies``). False: the collectives move contiguous
    buffers: Megatron's sequence-first layout, or galvatron's native runtime, whose ranks hold
    contiguous chunks of the flattened tokens (``galvatron.runtime.relayout.own_tokens``). The fused
    stack prices its memory-bound ops as a whole and ignores this."""
    cast_inputs_once: bool = False
    """Under autocast over an fp32 residual stream (``elementwise = "autocast"``) each attention's and
    MLP's input is cast to 16 bits once, at the module's entry (galvatron's native runtime; under
    sequence parallelism on the token shard before the all-gather, as Megatron gathers 16-bit
    activations): the linears reading it share that copy, in memory too, and add their input
    gradients in 16 bits. False: plain autocast, where each linear casts the fp32 input itself and
    keeps its own copy."""
    cast_fused_experts: bool = False
    """Under autocast over fp32 parameters the stack hands fused experts (3-D weights) 16-bit copies
    of their weights (galvatron's native runtime: ``runtime.expert_wrap.apply_expert_casts``), so
    experts that bypass autocast (``LayerSpec.experts_outside_autocast``) compute in 16 bits and an
    eager loop's full-size slice gradients (``LayerSpec.experts_sliced``) are 16-bit. False: the
    module runs as it is (fp32 GEMMs and gradients there)."""
    tensor_parallel_host_us: float = 0.0
    """Host microseconds tensor parallelism adds per linear layer of a ``tp > 1`` block and pass, beyond
    issuing its kernels (``host_us_per_kernel``): DTensor's Python dispatch (sharding propagation, the
    redistributions and the conversions between local tensors and DTensors). 0: TP costs no host time
    of its own (Megatron's plain tensors)."""
    fsdp_host_us: tuple[float, float] = (0.0, 0.0)
    """Host microseconds FSDP2 adds per unit (a block of a ZeRO-2 or ZeRO-3 layer group over more than
    one replica) and pass, beyond issuing its kernels: its pre- and post-forward and backward hooks
    (the all-gather's copy-in and copy-out, the reduce-scatter's set-up; ZeRO-3 also reshards after the
    forward and gathers again in backward). Per (ZeRO-2, ZeRO-3); 0: not modelled."""
    grad_bytes: int = 4
    """Bytes per gradient element kept and reduced (fp32 main grads in Megatron, FSDP2 reduce_dtype)."""
    cpu_adam_params_per_s: float = 1e9
    """CPU Adam throughput per GPU's share of host cores when optimizer states are offloaded
    (ZeRO-Offload, Ren et al. 2021, reports ~1 s per billion parameters per node for CPU-Adam)."""
    memory_headroom: float = 0.0
    """Fraction of device memory kept free for allocator fragmentation by the search."""
    master_weights: str = "params"
    """Where the fp32 master weights of a 16-bit run live (:data:`MASTER_WEIGHTS`). ``params``: the
    parameters themselves stay fp32 (PyTorch autocast and FSDP2 ``MixedPrecisionPolicy``: galvatron's
    native runtime, torchtitan): 4 bytes per parameter (sharded from ZeRO-2 on, as FSDP2 shards),
    8 of Adam moments, and 16-bit copies for compute that each micro-batch holds from its forward to
    its backward (autocast's casts; ZeRO-2's unsharded parameters; ZeRO-3 gathers them per layer).
    ``optimizer``: 16-bit parameters and a fp32 copy inside the optimizer (Megatron's distributed
    optimizer, DeepSpeed's bf16/fp16 modes; ZeRO paper §3.1): 2 + 12 bytes per parameter."""
    selective: str = "matmuls"
    """What ``recompute: selective`` keeps (:data:`SELECTIVE_POLICIES`). ``matmuls``: galvatron's
    native runtime (``galvatron.runtime.recompute``, also under the DeepSpeed backend): a selective
    checkpoint policy that saves the outputs of every GEMM and collective and recomputes the rest,
    attention core included. ``megatron``: Megatron-LM's attention-core recomputation (Korthikanti
    et al. 2022 §5: QK^T, softmax, dropout and AV are recomputed, everything else kept).
    ``torchtitan``: torchtitan's per-op activation checkpointing (``apply_ac`` op mode): saves the
    SDPA output and every other GEMM's output (the 2nd, 4th, ... of a block are recomputed)."""

    def __post_init__(self) -> None:
        if self.master_weights not in MASTER_WEIGHTS:
            raise ValueError(f"CostOptions.master_weights={self.master_weights!r}: expected one of "
                             f"{', '.join(MASTER_WEIGHTS)}")
        if self.elementwise not in ELEMENTWISE_STACKS:
            raise ValueError(f"CostOptions.elementwise={self.elementwise!r}: expected one of "
                             f"{', '.join(ELEMENTWISE_STACKS)}")
        if self.zero1_reduce not in ZERO1_REDUCES:
            raise ValueError(f"CostOptions.zero1_reduce={self.zero1_reduce!r}: expected one of "
                             f"{', '.join(ZERO1_REDUCES)}")
        if self.fp8_scaling not in FP8_SCALINGS:
            raise ValueError(f"CostOptions.fp8_scaling={self.fp8_scaling!r}: expected one of "
                             f"{', '.join(FP8_SCALINGS)}")
        if self.selective not in SELECTIVE_POLICIES:
            raise ValueError(f"CostOptions.selective={self.selective!r}: expected one of "
                             f"{', '.join(SELECTIVE_POLICIES)}")


ELEMENTWISE_STACKS = ("fused", "eager", "autocast")
"""How a stack runs memory-bound ops (``CostOptions.elementwise``; ``strategies.cost.eager``)."""
SELECTIVE_POLICIES = ("matmuls", "megatron", "torchtitan")
"""Selective-recomputation policies the cost model knows (``CostOptions.selective``)."""
ZERO1_REDUCES = ("reduce_scatter", "all_reduce")
"""How ZeRO-1 syncs gradients (``CostOptions.zero1_reduce``)."""
MASTER_WEIGHTS = ("params", "optimizer")
"""Where fp32 master weights live (``CostOptions.master_weights``)."""
