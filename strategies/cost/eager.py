"""Memory-bound kernels of a transformer block in eager PyTorch, op by op (``CostOptions.elementwise``).

A fused stack (Megatron-LM's fused kernels, ``torch.compile``) reads and writes each tensor about once
per norm, activation and residual (:data:`strategies.cost.layer._ELEMENTWISE_PER_H`). Eager PyTorch
launches one kernel per ATen op, and each reads its inputs from HBM and writes its output; autograd
runs one or more kernels per op again in backward (formulas of ``tools/autograd/derivatives.yaml``).
This module writes the ops of one block out, with the bytes per element each moves, for two eager
stacks:

- ``eager``: 16-bit activations and residual stream (FSDP2 ``MixedPrecisionPolicy(param_dtype=bf16)``,
  torchtitan): Llama's ``RMSNorm`` (``x.float()``, ``pow``, ``mean``, ``rsqrt``, ``mul``, ``type_as``,
  ``* weight``), complex rotary embedding (``view_as_complex(x.float()) * freqs_cis``, ``type_as``),
  ``repeat_kv`` copies for GQA, ``silu(w1 x) * w3 x``, residual adds; FSDP2 copies every all-gathered
  parameter out of the all-gather buffer and every gradient into the reduce-scatter buffer, casting
  it to the fp32 ``reduce_dtype`` (``foreach_all_gather_copy_out``, ``foreach_reduce``), on the
  compute stream.
- ``autocast``: ``torch.autocast(bf16)`` over fp32 parameters (galvatron's native runtime, the
  reference GPT): the residual stream stays fp32 (embedding output fp32, ``fp32 + bf16 -> fp32``);
  ``layer_norm`` is on autocast's fp32 list; every ``Linear`` casts its fp32 input to bf16 (the
  q, k, v and up projections each cast the same norm output again: only leaf tensors are cached);
  each weight is cast to bf16 once per forward (autocast's weight cache) and its gradient back to
  fp32 in backward. Blocks that FSDP2 holds (the native runtime's ZeRO-2/3) run the same ops over
  16-bit parameters and a 16-bit residual stream: no weight casts, ``rms_norm`` in 16 bits, and only
  ``layer_norm`` (on autocast's fp32 list) casts its input up and its output back per linear.

Per op: (forward bytes, backward bytes, forward kernels, backward kernels) per element of its width.
The backward of ``y = op(x)`` reads the incoming gradient and what the formula saved and writes the
input gradient; where one tensor feeds several ops (a norm output into q, k, v; the residual),
autograd adds the gradients with one more kernel each. Reductions over a token's hidden units
(``mean``) and per-token scalars (``rsqrt``) move no significant bytes but are kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

from galvatron.plan import LayerStrategy
from galvatron.spec import LayerSpec

Op = tuple[float, float, int, int]
"""(forward bytes, backward bytes, forward kernels, backward kernels) per element."""


@dataclass(frozen=True)
class Traffic:
    """Bytes and kernels of a layer's memory-bound ops per token (or per parameter) on one rank."""

    fwd: float = 0.0
    bwd: float = 0.0
    kernels_fwd: float = 0.0
    kernels_bwd: float = 0.0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.fwd + other.fwd, self.bwd + other.bwd, self.kernels_fwd + other.kernels_fwd,
                       self.kernels_bwd + other.kernels_bwd)

    def scaled(self, width: float, count: int = 1) -> Traffic:
        """``count`` ops over ``width`` elements per token (kernels counted once per op)."""
        return Traffic(self.fwd * width * count, self.bwd * width * count, self.kernels_fwd * count,
                       self.kernels_bwd * count)


def _op(fwd: float, bwd: float, kf: int = 1, kb: int = 1) -> Traffic:
    return Traffic(fwd, bwd, kf, kb)


def _cast(src: int, dst: int) -> Traffic:
    """``x.to(dtype)``: read ``src``, write ``dst`` bytes; backward casts the gradient back. No kernel
    when the dtype does not change."""
    return _op(src + dst, src + dst) if src != dst else Traffic()


def rms_norm(x: int) -> Traffic:
    """Composite RMSNorm on an ``x``-byte input, computed in fp32 (torchtitan's ``RMSNorm``; ATen's
    ``rms_norm`` composite): cast, ``pow(2)`` (8), ``mean`` (4), ``add(eps)`` and ``rsqrt`` (per-token),
    ``x * r`` (8), cast back, ``* weight`` (``2x``). Backward: weight mul (input grad ``2x``, weight
    grad mul ``3x`` and reduction ``x``), ``x * r`` (``g*r`` 8, ``(g*x).sum`` 12 + 4), ``mean``'s
    expand-divide (4), ``pow`` (``g * 2 * x.pow(1)``: 8 + 8 + 12), the two gradients of ``x``
    added (12)."""
    core = _op(8 + 4 + 8, 24 + 4 + 28 + 12, kf=5, kb=10)
    weight = _op(2 * x, 6 * x, kf=1, kb=3)
    return _cast(x, 4) + core + _cast(4, x) + weight


def layer_norm(x: int, compute: int) -> Traffic:
    """``native_layer_norm`` (one kernel each way) in ``compute`` bytes on an ``x``-byte input: read
    and write; backward reads the gradient and input and writes the input gradient, then reads both
    again for the weight and bias gradients."""
    return _cast(x, compute) + _op(2 * compute, 5 * compute, kf=1, kb=2)


def _norm(layer: LayerSpec, residual: int, compute: int, autocast: bool) -> Traffic:
    """The block's norm. RMSNorm is PyTorch's composite ops on the ``eager`` stack (torchtitan's own
    ``RMSNorm``; ``nn.RMSNorm`` before torch 2.8) and ``F.rms_norm``'s fused kernel on the ``autocast``
    stack (the native runtime on current PyTorch: one kernel each way, as fast as ``layer_norm``;
    benchmarks/results/norm_kernels.json), unless the model writes its RMSNorm out in ops
    (``LayerSpec.norm_composite``: Hugging Face's Llama; 0.372 s measured for a Llama 3.2 1B step on
    one H100, 0.336 predicted as fused, 0.377 as composite: benchmarks/results/wrap_auto)."""
    if layer.norm == "rmsnorm" and (not autocast or layer.norm_composite):
        return rms_norm(residual)
    return layer_norm(residual, compute)


def block_traffic(layer: LayerSpec, s: LayerStrategy, stack: str, act: int, res: int | None = None,
                  norm: int | None = None, *, sp_copies: bool = True, cast_first: bool = False) -> Traffic:
    """Bytes per token (and kernels) of one block's memory-bound ops on one rank under the eager
    ``stack`` (``eager`` or ``autocast``) with ``act``-byte activations, a ``res``-byte residual stream
    and ``norm``-byte norm outputs (default: fp32 both under ``autocast``, ``act`` on ``eager``; a
    block FSDP2 holds under autocast has a 16-bit stream: ``strategies.cost.layer.stream_bytes``); the
    attention core and the GEMMs are costed elsewhere. Widths per rank: the residual stream ``h``
    (over TP with SP: the norms and residual adds run on the sequence shard, the linears' input casts
    on the gathered sequence), ``q``, ``kv`` and the FFN width over TP; ``sp_copies``: SP's collectives
    copy their tensors whole (``CostOptions.sequence_parallel_copies``); ``cast_first``: each module's
    input is cast to ``act`` bytes once (on the shard under SP; ``CostOptions.cast_inputs_once``)."""
    autocast = stack == "autocast"
    res = res if res is not None else 4 if autocast else act
    norm = norm if norm is not None else 4 if autocast else act
    hr = layer.hidden / (s.tp if s.sp else 1)
    total = _norm(layer, res, norm, autocast).scaled(hr, 2) + _residual(res, act).scaled(hr, 2)
    sp = s.sp and s.tp > 1
    if cast_first:  # one cast per module (on the shard under SP); the linears share the 16-bit input
        regions = (1 if layer.heads else 0) + (1 if layer.ffn_hidden else 0)
        total += _cast(norm, act).scaled(hr, regions) + _input_grads(layer, act, act).scaled(layer.hidden)
        norm = act  # what the collectives carry
    else:
        total += _input_grads(layer, norm, act).scaled(layer.hidden)  # the linears read the gathered input
    if layer.heads:
        total += _attention_ops(layer, s, act, autocast)
    total += _mlp_ops(layer, s, act)
    if layer.bias:
        total += _bias_grads(layer, s, act)
    if layer.experts:  # token permutation (gather, scatter, weighting) per routed row
        total += _op(8, 16, kf=3, kb=3).scaled(layer.hidden * layer.top_k)
    if sp_copies and sp:
        total += sequence_parallel_copies(layer, norm, act)
    return total


def sequence_parallel_copies(layer: LayerSpec, norm: int, act: int) -> Traffic:
    """Bytes per token of rearranging batch-first activations around each sequence-parallel collective:
    DTensor gathers and scatters the sequence (dimension 1 of ``[batch, seq, hidden]``) through
    collectives on dimension 0, so every all-gather's output and every reduce-scatter's input is chunked
    and concatenated whole (``funcol.all_gather_single`` / ``reduce_scatter_single``: read and write the
    full tensor). Per region (attention, MLP): forward the gathered ``norm``-byte norm output and the
    reduce-scattered ``act``-byte projection output, backward the gradients of both. Megatron's
    sequence-first layout gathers dimension 0 and has none of these (the fused stack), nor has galvatron's
    native runtime since it shards the flattened tokens (``CostOptions.sequence_parallel_copies``).
    Measured in its tp2+sp step before (Llama 2 7B, 8 x 2048 tokens per rank, one H200):
    8 such ``cat`` kernels per block, 36 ms per step (benchmarks/results/multi_gpu/plans_llama2-7b_fake2.json)."""
    regions = (1 if layer.heads else 0) + (1 if layer.ffn_hidden else 0)
    per_pass = 2 * (norm + act) * regions
    return _op(per_pass, per_pass, kf=2 * regions, kb=2 * regions).scaled(layer.hidden)


def _bias_grads(layer: LayerSpec, s: LayerStrategy, act: int) -> Traffic:
    """Bias gradients: each linear layer's output gradient summed over the tokens in backward (read
    once, one reduction kernel per linear: q, k and v apart), the biases of routed experts aside.
    Measured in the GPT-3 XL step: 120 ``sum`` kernels, 1.9 ms of 114 (step_breakdown_gpt3xl.json)."""
    h, q, kv = layer.hidden, layer.heads * layer.head_dim / s.tp, layer.kv_heads * layer.head_dim / s.tp
    widths = (q + 2 * kv + h if layer.heads else 0) + layer.ffn_hidden * up_projections(layer) / s.tp + h
    return _op(0, act * widths, kf=0, kb=linears(layer))


def linears(layer: LayerSpec) -> int:
    """A block's linear layers as eager models write them: q, k, v (or one fused projection) and the
    output projection, then the up (and gate, or one fused gate-up) and down projections."""
    return (qkv_linears(layer) + 1 if layer.heads else 0) + input_readers(layer) + 1


def qkv_linears(layer: LayerSpec) -> int:
    """Linear layers reading the attention's input: q, k and v apart (3) or fused (1)."""
    return 1 if layer.fused_qkv else 3


def input_readers(layer: LayerSpec) -> int:
    """Linear layers reading the MLP's input: the up projection, gate and up apart, or one fused."""
    return 1 if layer.fused_gate_up else up_projections(layer)


def _residual(res: int, act: int) -> Traffic:
    """``x + f(x)``: read both, write ``res``; backward adds the branch's gradient into the stream's
    (read two, write one) and, when the branch is 16-bit and the stream fp32, casts the gradient
    down for the branch."""
    cast = act + res if res != act else 0
    return _op(res + act + res, 3 * res + cast, kf=1, kb=2 if cast else 1)


def _input_grads(layer: LayerSpec, norm: int, act: int) -> Traffic:
    """Linears reading the same ``norm``-byte norm output (q, k, v; up, or gate and up): under autocast
    each casts an fp32 input to 16 bits itself (and casts its input gradient back); autograd adds their
    input gradients (``n - 1`` adds of ``3 x norm``)."""
    out = Traffic()
    for n in ([qkv_linears(layer)] if layer.heads else []) + [input_readers(layer)]:
        out += _cast(norm, act).scaled(1, n) + _op(0, 3 * norm, kf=0, kb=1).scaled(1, n - 1)
    return out


def ffn_macs(layer: LayerSpec) -> float:
    """Multiply-adds per token of one FFN (one routed or shared expert): the block's GEMM FLOPs less
    attention's projections and a MoE router's ``h x experts``, over the FFNs a token visits."""
    h, q, kv = layer.hidden, layer.heads * layer.head_dim, layer.kv_heads * layer.head_dim
    routed = layer.top_k + layer.shared_experts if layer.experts else 1
    return (layer.flops_per_token / 2 - h * (q + 2 * kv) - q * h - h * layer.experts) / routed


def up_projections(layer: LayerSpec) -> int:
    """1 for a GELU MLP, 2 for a gated one (``silu(w1 x) * w3 x``), recognised by its FLOPs."""
    return 2 if layer.ffn_hidden and ffn_macs(layer) > 2.5 * layer.hidden * layer.ffn_hidden else 1


BROADCAST_SLOWDOWN = 2.3
"""How much longer than its bytes at the streaming rate an eager element-wise kernel takes when an
operand broadcasts or the output is a strided slice (TensorIterator's non-vectorized path): bf16
``x * cos`` with ``cos`` of shape (1, S, 1, D) ran at 1.16 TB/s and ``cat`` of two half-head slices at
0.93 TB/s, where contiguous kernels reach 2.7-3.0 on one H100 (benchmarks/results/step_breakdown.json)."""


def _rotate_half_rope(act: int) -> Traffic:
    """Hugging Face-style rotary embedding per element of q or k, in the activation dtype
    (``x * cos + cat(-x2, x1) * sin``): ``neg`` of one half (``act``), ``cat`` (``2 act``, strided),
    two broadcast multiplies (``2 act`` each) and the add (``3 act``). Backward: two broadcast
    multiplies, ``neg``, each half's gradient zero-filled and copied into place (``2 act`` each),
    and two adds into the input gradient (``3 act`` each)."""
    slow = BROADCAST_SLOWDOWN
    fwd = act + slow * 2 * act + 2 * slow * 2 * act + 3 * act
    bwd = 2 * slow * 2 * act + act + 2 * 2 * act + 2 * 3 * act
    return _op(fwd, bwd, kf=5, kb=9)


def _attention_ops(layer: LayerSpec, s: LayerStrategy, act: int, autocast: bool) -> Traffic:
    """Rotary embedding of q and k, and ``repeat_kv``'s copies of k and v to every query head under
    GQA (read kv, write q; backward sums them back). The rotation: torchtitan's complex form on the
    ``eager`` stack (cast to fp32 ``6``, broadcast complex multiply ``8``, cast back ``6``, the same
    backward); Hugging Face's rotate-half form on the ``autocast`` stack (the models the native
    runtime wraps, the reference GPT included: :func:`_rotate_half_rope`)."""
    q, kv = layer.heads * layer.head_dim / s.tp, layer.kv_heads * layer.head_dim / s.tp
    out = Traffic()
    if layer.rope:
        slow = BROADCAST_SLOWDOWN  # the complex multiply broadcasts freqs_cis (1, S, 1, D/2) too
        rope = _rotate_half_rope(act) if autocast else _cast(act, 4) + _op(8 * slow, 8 * slow) + _cast(4, act)
        out += rope.scaled(q) + rope.scaled(kv)
    if layer.kv_heads < layer.heads:
        out += _op(act * (q + kv), act * (q + kv)).scaled(1, 2)
    return out


def _mlp_ops(layer: LayerSpec, s: LayerStrategy, act: int) -> Traffic:
    """The activation between the up and down projections, per routed or shared expert: GELU (read,
    write; backward reads the gradient and input), or SiLU then the product with the up projection
    (``3 x act``; backward: two products and SiLU's gradient)."""
    routed = layer.top_k + layer.shared_experts if layer.experts else 1
    width = layer.ffn_hidden * routed / s.tp
    if up_projections(layer) == 2:
        return _op(5 * act, 9 * act, kf=2, kb=3).scaled(width)
    return _op(2 * act, 3 * act).scaled(width)


def loss_traffic(stack: str) -> Traffic:
    """Bytes per logit of the loss. Fused (Megatron's vocab-parallel cross-entropy): 12 each way.
    Eager ``F.cross_entropy(logits.float(), y)``: the cast (2 + 4), ``log_softmax`` over a row too
    long for shared memory reads it three times (max, sum of exponentials, output) and writes it;
    backward: ``nll_loss`` writes a zero fp32 gradient and scatters, ``log_softmax``'s backward
    reads the gradient twice and the output once and writes (16), the cast back (4 + 2)."""
    if stack == "fused":
        return _op(12, 12, kf=0, kb=0)
    return _op(6 + 16, 4 + 16 + 6, kf=3, kb=4)


FSDP_COPY_IN_SLOWDOWN = 2.9
"""How much longer than its bytes at the streaming rate FSDP2's all-gather copy-in takes
(``torch._foreach_copy_`` casting each fp32 shard into the gather's 16-bit input, many tensors per
call): 0.80 TB/s in torchtitan's Llama 3.1 8B step on one H100 (benchmarks/results/titan_reproduce.json)
and 1.18 TB/s in Llama 2 7B at dp2 ZeRO-2 on one H200 (benchmarks/results/multi_gpu/plans_llama2-7b_fake2.json),
where streaming kernels run 2.53 and 3.09 TB/s in step: 3.2x and 2.6x."""

REDUCE_COPY_SLOWDOWN = 1.5
"""The same for FSDP2's reduce-scatter copy-in (``_chunk_cat``: the 16-bit gradients chunked into the
fp32 reduce-scatter input): 1.80 TB/s on the H100 and 1.92 TB/s on the H200 in the same steps (1.4x
and 1.6x). The all-gather copy-out (``split_with_sizes_copy``) streams (2.85 / 3.95 TB/s)."""


def param_traffic(stack: str, act: int, grad: int, zero: int, fsdp2: bool = True, shards: int = 1) -> Traffic:
    """Bytes per parameter of the rank's compute copy per micro-batch, outside the optimizer.
    ``autocast``: each weight cast to 16 bits in forward (read 4, write ``act``) and its gradient back
    to fp32 in backward. ``eager`` or ``fused`` with FSDP2 (``fsdp2``) at ZeRO-3: before the forward
    and again before the backward, this rank's fp32 shard (one of ``shards``) cast into the
    all-gather's input (read 4, write ``act``) and the gathered output copied out into the unsharded
    parameters (read and write ``act``), and the gradient copied into the reduce-scatter buffer in
    the ``grad`` reduce dtype; at ZeRO-2 the parameters stay unsharded from the forward to the
    backward, so they are gathered once. ZeRO-3 on another stack (DeepSpeed's) copies out as FSDP2's
    ZeRO-3 does. These copies run outside ``torch.compile``'d blocks too (torchtitan's compiled Llama
    3.1 8B step: 50 ms of ``split_with_sizes_copy`` and ``chunk_cat`` on one H100,
    benchmarks/results/titan_reproduce.json)."""
    if stack == "autocast":
        return _op(4 + act, 4 + act, kf=0, kb=0)
    gather = 2 * act + (FSDP_COPY_IN_SLOWDOWN * (4 + act) / shards if fsdp2 else 0.0)
    reduce = REDUCE_COPY_SLOWDOWN * (act + grad) if fsdp2 else act + grad
    if stack in ("eager", "fused") and zero == 3:
        return _op(gather, gather + reduce, kf=0, kb=0)
    if stack in ("eager", "fused") and zero == 2 and fsdp2:
        return _op(gather, reduce, kf=0, kb=0)
    return Traffic()


def accumulate_traffic(new: int, held: int) -> Traffic:
    """Bytes per parameter of adding one micro-batch's weight gradient into the gradient kept across
    micro-batches, where the weight-gradient GEMM writes a fresh tensor instead of accumulating
    itself (``CostOptions.wgrad_fp32_accumulation`` False): autograd's ``AccumulateGrad`` adds it in
    place (``grad += new``: read ``new`` and ``held`` bytes, write ``held``), on every micro-batch
    after the first (the first one's tensor is kept as the gradient). Backward only."""
    return _op(0, new + 2 * held, kf=0, kb=0)
