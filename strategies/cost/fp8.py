"""FP8 training as Transformer Engine runs it: the memory-bound kernels that feed FP8 GEMMs.

A plan with ``dtype: fp8`` is costed as NVIDIA Transformer Engine (TE) runs it under Megatron-Core,
the stack of the published FP8 runs (NeMo, Megatron-Bridge): the linear layers inside the
transformer blocks compute in FP8 (E4M3 in the forward, E5M2 for gradients: TE's ``hybrid``
format) and write 16-bit outputs; the embedding, the output layer (a plain Megatron
``ColumnParallelLinear``) and the loss, the norms, attention and the residual stream stay in bf16.

An FP8 GEMM reads FP8 operands, and its weight-gradient GEMM reads both operands transposed, so TE
quantizes every GEMM input, weight and output gradient, and transposes what the weight gradient
reads (TE 1.x ``module/linear.py`` and ``module/layernorm_linear.py``; bytes per element, 16-bit
read 2, FP8 write 1):

- a column-parallel input written by the norm before it (``LayerNormLinear``: QKV, the MLP's up
  projection): the norm kernel writes FP8 itself, one byte less than a 16-bit output; under sequence
  parallelism the FP8 shard is all-gathered, and the backward re-gathers it and transposes the whole
  input for the weight gradient (read 1, write 1);
- any other input (the attention output before its projection, the activation before the down
  projection): ``fp8_cast_transpose`` writes the FP8 copy and its transpose at once (4 bytes), or,
  under sequence parallelism, a cast in the forward (3) and a transpose in the backward (2);
- each output gradient: cast and transposed at once (4; the bias gradient rides along); a
  row-parallel layer under sequence parallelism casts its gradient shard (3), all-gathers it in FP8
  and transposes the gathered tensor (2);
- the weights once per step, at the first micro-batch (TE caches them over the rest): cast and
  transposed (4 bytes per parameter); with FP8 parameters (Megatron's ``--fp8-param-gather``) the
  optimizer writes them in FP8 and only the transpose is left (2).

Current scaling (``CostOptions.fp8_scaling = "current"``, Megatron-Bridge's ``tensorwise`` recipe)
scales each tensor by its own maximum, so every quantization first reads the 16-bit tensor for its
maximum: two bytes more per element quantized. Delayed scaling takes the scale from earlier steps'
maxima, which the cast kernel records as it goes (Micikevicius et al. 2022, "FP8 Formats for Deep
Learning", §4.3). The amax reductions and scale updates (a few small kernels and one small
all-reduce per micro-batch) are not charged.

Memory: TE keeps FP8 weight copies and their transposes beside the 16-bit parameters (2 bytes per
parameter; none extra with FP8 parameters, which take 1 byte and their transpose cache 1), and
saves the GEMM inputs it quantized in FP8 for the backward: the norm-written inputs and the down
projection's input take one byte where they took two, and the output projection keeps an FP8 copy of
the attention output, which the attention kernel still keeps in 16 bits.
"""

from __future__ import annotations

from galvatron.strategies.cost.eager import Traffic

FP8_SCALINGS = ("delayed", "current")
"""How FP8 scaling factors are chosen (``CostOptions.fp8_scaling``)."""

NORM, COLUMN, ROW, LOCAL = "norm", "column", "row", "local"
"""Where a block GEMM's input comes from and where its output goes: ``NORM`` a column-parallel input
the norm writes (TE ``LayerNormLinear``), ``COLUMN`` another column-parallel input, ``ROW`` a
row-parallel layer (its output reduced over TP), ``LOCAL`` a GEMM without TP collectives of its own
(routed experts)."""


def gemm_quantize(role: str, m: float, n: float, k: float, count: int, tp: int, sp: bool,
                  scaling: str = "delayed") -> Traffic:
    """Quantization traffic of one GEMM of ``m`` rows, ``k`` inputs and ``n`` outputs on the rank
    (``count`` of them in one grouped kernel), by its ``role`` (:data:`NORM` ...), as the module
    docstring lists it. ``m`` is the rows the GEMM computes (the gathered ones under sequence
    parallelism); a shard is ``m / tp`` of them."""
    if scaling not in FP8_SCALINGS:
        raise ValueError(f"fp8 scaling {scaling!r}: expected one of {', '.join(FP8_SCALINGS)}")
    sharded = sp and tp > 1
    shard = tp if sharded else 1
    x, dy = m * k * count, m * n * count
    amax = 2.0 if scaling == "current" else 0.0  # an extra read of each 16-bit tensor quantized
    q = Traffic()
    # the input
    if role == NORM:
        q += Traffic(fwd=(amax - 1.0) * x / shard, bwd=2.0 * x, kernels_bwd=1)
    elif sharded and role in (COLUMN, ROW):
        cast = x / shard if role == COLUMN else x  # a column input is cast on the shard, then gathered
        q += Traffic(fwd=(3.0 + amax) * cast, bwd=2.0 * x, kernels_fwd=1, kernels_bwd=1)
    else:
        q += Traffic(fwd=(4.0 + amax) * x, kernels_fwd=1)
    # the output gradient
    if role == ROW and sharded:
        q += Traffic(bwd=(3.0 + amax) * dy / shard + 2.0 * dy, kernels_bwd=2)
    else:
        q += Traffic(bwd=(4.0 + amax) * dy, kernels_bwd=1)
    return q


def weight_quantize_bytes(params: float, scaling: str = "delayed", fp8_params: bool = False) -> float:
    """Bytes moved per step to give ``params`` weights their FP8 copy and transpose (at the first
    micro-batch): cast and transpose from 16 bits (4 per parameter, 6 with current scaling), or only
    the transpose of FP8 parameters (2)."""
    if fp8_params:
        return 2.0 * params
    return (6.0 if scaling == "current" else 4.0) * params


def weight_copy_bytes(params: float, fp8_params: bool = False) -> float:
    """Device bytes TE keeps per rank besides the 16-bit parameters: the FP8 weight and its transpose
    (2 per parameter). FP8 parameters (1 byte each, counted as the parameters') keep a transpose cache
    of 1 byte: the same total as 16-bit parameters, so nothing extra here."""
    return 0.0 if fp8_params else 2.0 * params


def saved_bytes_delta(hidden: float, q: float, ffn: float, tp: int, sp: bool, norm_inputs: int,
                      up_rows: float, down_rows: float) -> float:
    """Bytes per token that TE's FP8 linears change in what a block keeps for its backward (no full
    recomputation), against the 16-bit count of :mod:`galvatron.spec_config`: each of the
    ``norm_inputs`` norm-written GEMM inputs (``h``, split over TP under sequence parallelism), each
    routed row's expert input (``up_rows`` of ``h``: MoE) and each down projection's input
    (``down_rows`` of ``ffn``) is kept in FP8, one byte less per element (the routed rows' terms split
    over TP as the spec's count of them is); the output projection adds an FP8 copy of the attention
    output (``q / tp``). Negative: a saving."""
    shard = tp if sp and tp > 1 else 1
    return -norm_inputs * hidden / shard - (up_rows * hidden + down_rows * ffn) / tp + q / tp
