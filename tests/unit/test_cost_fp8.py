"""FP8 plans as Transformer Engine runs them, and tensor-parallel communication overlap (userbuffers)."""

from __future__ import annotations

import dataclasses

import pytest
from galvatron.strategies.cost import Collective, CostOptions, DatasheetPerf, LayerContext, fp8, layer_cost
from galvatron.strategies.cost.layer import (
    _activation,
    _block_comm,
    _block_linears,
    _fp8_quantize,
    _gemm_parts,
    _group,
    _tp_gemms,
    zero_terms,
)
from galvatron.strategies.cost.step import hidden_behind
from galvatron.strategies.hardware import load_cluster

from galvatron.plan import DType, LayerStrategy, Recompute
from galvatron.spec import LayerKind, ModelSpec

SPEC = ModelSpec.from_config("llama2-7b")  # h 4096, MHA, SwiGLU f 11008
BLOCK = SPEC.blocks[0]
HEAD = SPEC.layers_of(LayerKind.HEAD)[0]
PERF = DatasheetPerf(load_cluster("8xH100"))
MEGATRON = CostOptions(persistent_grads=True, master_weights="optimizer", selective="megatron")


def _ctx(dtype: DType, options: CostOptions = MEGATRON, micro_batch: int = 8) -> LayerContext:
    return LayerContext(perf=PERF, options=options, dtype=dtype, seq_len=4096, causal=True, micro_batch=micro_batch,
                        stage_devices=8)


def test_quantize_bytes_per_role() -> None:
    """TE's casts and transposes, element by element (module docstring of strategies.cost.fp8)."""
    m, n, k = 100.0, 30.0, 20.0
    x, dy = m * k, m * n
    # a norm-written input: the norm writes FP8 (one byte less), the transpose comes in the backward
    q = fp8.gemm_quantize(fp8.NORM, m, n, k, 1, tp=1, sp=False)
    assert (q.fwd, q.bwd) == (-x, 2 * x + 4 * dy)
    # under SP the shard is cast and gathered; the whole gathered input is transposed
    q = fp8.gemm_quantize(fp8.NORM, m, n, k, 1, tp=4, sp=True)
    assert (q.fwd, q.bwd) == (-x / 4, 2 * x + 4 * dy)
    # a row-parallel input: cast and transposed at once, or cast then transposed under SP, whose output
    # gradient is cast on the shard, gathered and transposed
    q = fp8.gemm_quantize(fp8.ROW, m, n, k, 1, tp=1, sp=False)
    assert (q.fwd, q.bwd) == (4 * x, 4 * dy)
    q = fp8.gemm_quantize(fp8.ROW, m, n, k, 1, tp=4, sp=True)
    assert (q.fwd, q.bwd) == (3 * x, 2 * x + 3 * dy / 4 + 2 * dy)
    # a column input that no norm wrote, under SP: cast on the shard
    q = fp8.gemm_quantize(fp8.COLUMN, m, n, k, 2, tp=4, sp=True)
    assert (q.fwd, q.bwd) == (3 * 2 * x / 4, 2 * 2 * x + 4 * 2 * dy)
    # current scaling reads every 16-bit tensor it quantizes once more for its maximum
    delayed = fp8.gemm_quantize(fp8.LOCAL, m, n, k, 1, tp=1, sp=False)
    current = fp8.gemm_quantize(fp8.LOCAL, m, n, k, 1, tp=1, sp=False, scaling="current")
    assert (current.fwd - delayed.fwd, current.bwd - delayed.bwd) == (2 * x, 2 * dy)
    with pytest.raises(ValueError, match="scaling"):
        fp8.gemm_quantize(fp8.LOCAL, m, n, k, 1, tp=1, sp=False, scaling="tensor")
    with pytest.raises(ValueError, match="fp8_scaling"):
        CostOptions(fp8_scaling="block")


def test_block_quantize_time_is_its_bytes() -> None:
    """A Llama 2 7B block at TP 1: forward -h (QKV input) + 4h (attention output) - h (MLP input) + 4f (SwiGLU
    output); backward 2h + 2h transposes of the norm-written inputs and 4 bytes per output-gradient element
    (3h QKV, h, 2f gate and up, h), per token; each cast or transpose one kernel."""
    ctx = _ctx(DType.FP8)
    s = LayerStrategy(dp=8)
    tok = 8 / 8 * 4096
    h, f = 4096, 11008
    fwd_bytes = (-h + 4 * h - h + 4 * f) * tok
    bwd_bytes = (2 * h + 2 * h + 4 * (3 * h + h + 2 * f + h)) * tok
    fixed = PERF.cluster.gpu.kernel_overhead_us * 1e-6
    fwd, bwd = _fp8_quantize(ctx, BLOCK, s, tok, 1.0, True)
    assert fwd == pytest.approx(PERF.memory_time(fwd_bytes) + 2 * fixed)
    assert bwd == pytest.approx(PERF.memory_time(bwd_bytes) + 6 * fixed)


def test_fp8_runs_block_gemms_in_fp8_and_the_head_in_bf16() -> None:
    """Megatron's output layer is not a TE linear: it runs in bf16 whatever the plan's dtype; a block's
    forward is faster in FP8 by its GEMMs less what the casts cost."""
    s = LayerStrategy(dp=8)
    head8, head16 = layer_cost(_ctx(DType.FP8), HEAD, s), layer_cost(_ctx(DType.BF16), HEAD, s)
    assert head8.fwd == pytest.approx(head16.fwd) and head8.bwd == pytest.approx(head16.bwd)
    block8, block16 = layer_cost(_ctx(DType.FP8), BLOCK, s), layer_cost(_ctx(DType.BF16), BLOCK, s)
    assert block8.fwd < 0.8 * block16.fwd


def test_fp8_memory_weight_copies_and_saved_inputs() -> None:
    """TE keeps an FP8 weight and its transpose per parameter (2 bytes) unless the parameters are FP8 (1 byte,
    their transpose 1); it keeps the norm-written inputs and the down projection's input in FP8 and adds an FP8
    copy of the attention output."""
    s = LayerStrategy(dp=8)
    params = BLOCK.params
    bf16 = zero_terms(_ctx(DType.BF16), BLOCK, s).params
    assert bf16 == pytest.approx(2 * params)
    assert zero_terms(_ctx(DType.FP8), BLOCK, s).params == pytest.approx(4 * params)
    fp8_params = dataclasses.replace(MEGATRON, fp8_params=True)
    assert zero_terms(_ctx(DType.FP8, fp8_params), BLOCK, s).params == pytest.approx(params)
    # under ZeRO-3 the copies exist beside the gathered layer only: transient, like its gathered parameters
    z3 = LayerStrategy(dp=8, zero=3)
    held8, held16 = zero_terms(_ctx(DType.FP8), BLOCK, z3), zero_terms(_ctx(DType.BF16), BLOCK, z3)
    assert held8.params == pytest.approx(held16.params) and held8.work == pytest.approx(held16.work + 2 * params)
    h, q, f = 4096, 4096, 11008
    for tp, sp in ((1, False), (2, True)):
        s = LayerStrategy(dp=8 // tp, tp=tp, sp=sp)
        saved16 = _activation(_ctx(DType.BF16), BLOCK, s, Recompute.NONE)
        saved8 = _activation(_ctx(DType.FP8), BLOCK, s, Recompute.NONE)
        assert saved8 - saved16 == pytest.approx(-2 * h / tp - f / tp + q / tp)
    full = LayerStrategy(dp=8, recompute="full")
    assert _activation(_ctx(DType.FP8), BLOCK, full, Recompute.FULL) == _activation(
        _ctx(DType.BF16), BLOCK, full, Recompute.FULL)


def test_fp8_weight_quantization_once_per_step() -> None:
    s = LayerStrategy(dp=8)
    post = {opts: zero_terms(_ctx(DType.FP8, opts), BLOCK, s).post - zero_terms(_ctx(DType.BF16, opts), BLOCK, s).post
            for opts in (MEGATRON, dataclasses.replace(MEGATRON, fp8_scaling="current"),
                         dataclasses.replace(MEGATRON, fp8_params=True))}
    assert list(post.values()) == pytest.approx([PERF.memory_time(b * BLOCK.params) for b in (4, 6, 2)])


def test_sequence_parallel_gathers_fp8() -> None:
    """TE quantizes before it gathers: an FP8 plan's all-gathers move one byte per element, its
    reduce-scatters two (Megatron's default: exposed in the forward)."""
    s = LayerStrategy(dp=2, tp=4, sp=True)
    tok = 8 / 2 * 4096
    group = _group(_ctx(DType.FP8), 1, 4)
    ag8 = PERF.collective_time(Collective.ALL_GATHER, tok * 4096, group)
    ag16 = PERF.collective_time(Collective.ALL_GATHER, tok * 4096 * 2, group)
    rs = PERF.collective_time(Collective.REDUCE_SCATTER, tok * 4096 * 2, group)
    assert _block_comm(_ctx(DType.FP8), BLOCK, s, tok)["tp"] == pytest.approx(2 * (ag8 + rs))
    assert _block_comm(_ctx(DType.BF16), BLOCK, s, tok)["tp"] == pytest.approx(2 * (ag16 + rs))
    assert ag8 < ag16


def test_tp_comm_overlap_hides_tensor_parallel_collectives() -> None:
    """Userbuffers overlap: each collective behind the GEMM beside it. Forward: the all-gather behind the
    column GEMM (QKV; gate and up), the reduce-scatter behind the row GEMM (output; down projection);
    backward: the output gradient's all-gather behind the row GEMM's input gradient, the input's re-gather
    behind the column GEMM's input gradient and the input gradient's reduce-scatter behind its weight
    gradient. In FP8 (all-gathers of one byte per element, reduce-scatters of two, GEMMs twice as fast) which
    GEMM hides which collective matters."""
    s = LayerStrategy(dp=2, tp=4, sp=True)
    opts = dataclasses.replace(MEGATRON, tp_comm_overlap=True)
    ctx = _ctx(DType.FP8, opts)
    tok, h, f, t = 8 / 2 * 4096, 4096, 11008, 4
    group = _group(ctx, 1, t)
    ag = PERF.collective_time(Collective.ALL_GATHER, tok * h, group)
    rs = PERF.collective_time(Collective.REDUCE_SCATTER, tok * h * 2, group)

    def times(m: float, n: float, k: float) -> tuple[float, float, float]:
        return (PERF.gemm_time(m, n, k, "fp8"), PERF.gemm_time(m, k, n, "fp8", backward=True),
                PERF.gemm_time(k, n, m, "fp8", backward=True, accumulate=True))

    gemm_flops = 2 * tok * (3 * h * h + h * h + 2 * f * h + f * h) / t
    scale = BLOCK.flops_per_token * tok / t / gemm_flops
    parts = [(times(tok, 3 * h / t, h), times(tok, h, h / t)), (times(tok, 2 * f / t, h), times(tok, h, f / t))]

    def hide(comm: float, gemm: float) -> float:
        return hidden_behind(comm, scale * gemm, opts)

    expected = sum(hide(ag, col[0]) + hide(rs, row[0]) + hide(ag, row[1]) + hide(ag, col[1]) + hide(rs, col[2])
                   for col, row in parts)
    hidden = layer_cost(ctx, BLOCK, s)
    assert hidden.comm["tp"] == pytest.approx(expected)
    plain = layer_cost(_ctx(DType.FP8), BLOCK, s)
    assert hidden.comm["tp"] < 0.5 * plain.comm["tp"]
    # without sequence parallelism there is nothing to overlap (TE's userbuffers need it)
    s_ar = LayerStrategy(dp=2, tp=4)
    assert layer_cost(ctx, BLOCK, s_ar).comm["tp"] == layer_cost(_ctx(DType.FP8), BLOCK, s_ar).comm["tp"]


def test_tp_comm_overlap_leaves_moe_token_collectives_exposed() -> None:
    """A MoE layer's TP collectives gather and scatter tokens around its router and dispatch: no GEMM runs
    beside them, so overlap hides only the attention's (and, under MoE Parallel Folding, the MLP part has
    no TP collectives at all)."""
    moe = ModelSpec.from_config("mixtral-8x7b").blocks[0]
    opts = dataclasses.replace(MEGATRON, tp_comm_overlap=True)
    ctx = _ctx(DType.BF16, opts)
    tok = 8 / 4 * 4096
    for etp, parts in ((0, 2), (1, 1)):
        s = LayerStrategy(dp=4, tp=2, sp=True, ep=2, etp=etp)
        linears = _block_linears(moe, s, tok)
        times = _gemm_parts(ctx, [g for g, _ in linears], moe.flops_per_token * tok / 2)
        gemms = _tp_gemms(moe, s, linears, times)
        assert len(gemms) == parts and min(gemms[0][0]) > 0 and min(gemms[0][1]) > 0
        if parts == 2:
            assert gemms[1] == ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
        # overlap never costs more than running the collectives as Megatron does without it
        hidden, plain = layer_cost(ctx, moe, s).comm["tp"], layer_cost(_ctx(DType.BF16), moe, s).comm["tp"]
        assert hidden < plain
