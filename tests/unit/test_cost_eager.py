"""Eager PyTorch's memory-bound kernels in the cost model (``CostOptions.elementwise``)."""

from __future__ import annotations

import dataclasses

import pytest
from galvatron.strategies.cost import CostOptions, LayerContext, cost_plan, eager, layer_cost
from galvatron.strategies.cost.eager import Traffic
from galvatron.strategies.cost.perf import DatasheetPerf
from galvatron.strategies.hardware import load_cluster

from galvatron.backends import capabilities
from galvatron.models import GPT, GPTConfig
from galvatron.plan import DType, LayerStrategy, Plan
from galvatron.spec import ModelSpec

LLAMA = ModelSpec.from_config("llama3-8b")
GPT_1B_CONFIG = {"name": "gpt", "layers": 24, "hidden": 2048, "heads": 16, "vocab": 50304, "seq_len": 2048,
                 "activation": "gelu", "norm": "layernorm", "bias": False, "position": "learned"}
GPT_1B = ModelSpec.from_config(GPT_1B_CONFIG)


def test_llama_block_bytes_hand_counted() -> None:
    """torchtitan's Llama block, 16-bit activations: per token h=4096, q=4096, kv=1024, f=14336.
    Forward: 2 RMSNorms x 36h, 2 residual adds x 6h, rotary (6 + 8 slow + 6)(q+kv) (its complex
    multiply broadcasts), repeat_kv 2 x 2(q+kv), SwiGLU 10f. Backward: 2 x 92h, 2 x 6h, input-gradient
    adds (2 for q/k/v, 1 for gate/up) x 6h, the same rotary and repeat_kv bytes, SwiGLU 18f."""
    h, q, kv, f = 4096, 4096, 1024, 14336
    rope = 12 + 8 * eager.BROADCAST_SLOWDOWN
    t = eager.block_traffic(LLAMA.blocks[0], LayerStrategy(), "eager", 2)
    assert t.fwd == pytest.approx(2 * 36 * h + 2 * 6 * h + rope * (q + kv) + 4 * (q + kv) + 10 * f)
    assert t.bwd == pytest.approx(2 * 92 * h + 2 * 6 * h + 3 * 6 * h + rope * (q + kv) + 4 * (q + kv) + 18 * f)


def test_rotate_half_rope_under_autocast_hand_counted() -> None:
    """The reference GPT's (Hugging Face's) rotary embedding per element of q and k in bf16: forward
    neg of a half (2), cat (4, strided), two broadcast multiplies (4 each), add (6); backward two
    broadcast multiplies, neg (2), each half's gradient zero-filled and copied (4 each), two adds (6)."""
    slow = eager.BROADCAST_SLOWDOWN
    with_rope = ModelSpec.from_config({**GPT_1B_CONFIG, "position": "rope"}).blocks[0]
    extra = eager.block_traffic(with_rope, LayerStrategy(), "autocast", 2) + Traffic(
        *(-x for x in dataclasses.astuple(eager.block_traffic(GPT_1B.blocks[0], LayerStrategy(), "autocast", 2))))
    width = 2 * 2048  # q and k
    assert extra.fwd == pytest.approx((2 + 4 * slow + 2 * 4 * slow + 6) * width)
    assert extra.bwd == pytest.approx((2 * 4 * slow + 2 + 2 * 4 + 2 * 6) * width)
    assert (extra.kernels_fwd, extra.kernels_bwd) == (2 * 5, 2 * 9)


def test_autocast_gpt_block_bytes_hand_counted() -> None:
    """Reference GPT under autocast (fp32 stream, LayerNorm in fp32, GELU, f = 4h, no RoPE, MHA).
    Forward: LayerNorm 8h x 2, residual (4 + 2 + 4)h x 2, fp32->bf16 casts before q, k, v, up 6h x 4,
    GELU 4f. Backward: LayerNorm 20h x 2, residual (12 + 6)h x 2, casts back 6h x 4 and two fp32 adds
    of the q/k/v input gradients 12h x 2, GELU 6f."""
    h, f = 2048, 8192
    t = eager.block_traffic(GPT_1B.blocks[0], LayerStrategy(), "autocast", 2)
    assert t.fwd == 16 * h + 20 * h + 24 * h + 4 * f
    assert t.bwd == 40 * h + 36 * h + 24 * h + 24 * h + 6 * f


def test_rms_norm_and_tensor_parallel_widths() -> None:
    assert (eager.rms_norm(2).fwd, eager.rms_norm(2).bwd) == (36, 92)
    assert eager.layer_norm(2, 2).fwd == 4
    layer = LLAMA.blocks[0]
    for stack, act in (("eager", 2), ("autocast", 2)):
        full = eager.block_traffic(layer, LayerStrategy(), stack, act)
        sp = eager.block_traffic(layer, LayerStrategy(tp=4, sp=True), stack, act)
        # under SP the norms, residuals and per-head ops split four ways; the linears still read (and
        # autocast still casts) the gathered input, and DTensor rearranges each collective's tensor
        norm = 4 if stack == "autocast" else act
        gathered = eager._input_grads(layer, norm, act).scaled(layer.hidden)
        copies = eager.sequence_parallel_copies(layer, norm, act)
        assert copies.fwd == copies.bwd == 2 * (norm + act) * 2 * layer.hidden  # attention and MLP
        for part in ("fwd", "bwd"):
            expected = (getattr(full, part) - getattr(gathered, part)) / 4 + getattr(gathered, part) + \
                getattr(copies, part)
            assert getattr(sp, part) == pytest.approx(expected), (stack, part)
        assert sp.kernels_fwd == full.kernels_fwd + 4
        # contiguous collectives (Megatron's layout, the native runtime's token shards): no copies
        contiguous = eager.block_traffic(layer, LayerStrategy(tp=4, sp=True), stack, act, sp_copies=False)
        assert (contiguous.fwd, contiguous.bwd) == pytest.approx((sp.fwd - copies.fwd, sp.bwd - copies.bwd))
        assert contiguous.kernels_fwd == full.kernels_fwd
    # autocast with the cast before the gather (the native runtime): one cast per module on the shard
    # (fp32 -> bf16, backward back), where each linear cast the gathered input; adds in 16 bits
    s = LayerStrategy(tp=4, sp=True)
    each = eager.block_traffic(layer, s, "autocast", 2, sp_copies=False)
    first = eager.block_traffic(layer, s, "autocast", 2, sp_copies=False, cast_first=True)
    h = layer.hidden
    readers = eager.qkv_linears(layer) + eager.input_readers(layer)  # 3 + 2
    assert each.kernels_fwd - first.kernels_fwd == readers - 2
    assert each.fwd - first.fwd == pytest.approx(readers * 6 * h - 2 * 6 * h / 4)
    adds = readers - 2  # the input gradients of the linears reading one input, summed
    assert each.bwd - first.bwd == pytest.approx(readers * 6 * h - 2 * 6 * h / 4 + adds * 3 * (4 - 2) * h)


def _block_times(spec: ModelSpec, elementwise: str, **kw: object) -> tuple[float, float]:
    ctx = LayerContext(perf=DatasheetPerf(load_cluster("8xH100")), options=CostOptions(elementwise=elementwise),
                       dtype=DType.BF16, seq_len=spec.seq_len, causal=True, micro_batch=8, stage_devices=8)
    c = layer_cost(ctx, spec.blocks[0], LayerStrategy(dp=8, **kw))
    return c.fwd, c.bwd


# (a 16-bit LayerNorm/GELU block without RoPE is left out: there eager PyTorch runs one kernel per norm and
# activation too, and the fused stack's flat rotary/cast bytes make it the dearer of the two)
@pytest.mark.parametrize("spec,stack", [(LLAMA, "eager"), (GPT_1B, "autocast")])
def test_eager_blocks_slower_than_fused(spec: ModelSpec, stack: str) -> None:
    fused, slow = _block_times(spec, "fused"), _block_times(spec, stack)
    assert slow[0] > fused[0] and slow[1] > fused[1]


def test_eager_stack_slows_a_whole_plan_and_its_loss() -> None:
    cluster = load_cluster("8xH100")
    plan = Plan.uniform(LLAMA.num_blocks, global_batch_size=8, num_micro_batches=1, dp=8, zero=3)
    steps = {e: cost_plan(plan, LLAMA, cluster, CostOptions(elementwise=e)).step_time_s
             for e in ("fused", "eager", "autocast")}
    assert steps["fused"] < steps["eager"] and steps["fused"] < steps["autocast"]
    assert eager.loss_traffic("eager").fwd > eager.loss_traffic("fused").fwd == 12


def test_fsdp2_copies_under_zero2_and_zero3_and_autocast_casts_always() -> None:
    assert eager.param_traffic("eager", 2, 4, zero=0).fwd == eager.param_traffic("eager", 2, 4, zero=1).fwd == 0
    # ZeRO-3 gathers before forward and backward: the fp32 shard cast in (6 bytes over 2 shards, at the
    # copy-in's measured slowdown), the 16-bit parameters copied out (4); the backward also copies the
    # gradient into the fp32 reduce-scatter input (6, at its slowdown)
    cast_in, reduce = eager.FSDP_COPY_IN_SLOWDOWN * 3, eager.REDUCE_COPY_SLOWDOWN * 6
    assert eager.param_traffic("eager", 2, 4, zero=3, shards=2).fwd == pytest.approx(cast_in + 4)
    assert eager.param_traffic("eager", 2, 4, zero=3, shards=2).bwd == pytest.approx(cast_in + 4 + reduce)
    assert eager.param_traffic("autocast", 2, 4, 0).fwd == 6
    # ZeRO-2 keeps FSDP2's unsharded parameters to the backward: one gather, then the gradient's copy-in
    z2 = eager.param_traffic("eager", 2, 4, zero=2, shards=2)
    assert (z2.fwd, z2.bwd) == pytest.approx((cast_in + 4, reduce))
    assert eager.param_traffic("eager", 2, 4, zero=2, fsdp2=False).fwd == 0  # DeepSpeed's ZeRO-2 copies nothing
    assert eager.param_traffic("eager", 2, 4, zero=3, fsdp2=False).fwd == 4  # nor casts into a gather
    # FSDP2's copies run outside compiled blocks: a fused stack pays them as an eager one
    assert eager.param_traffic("fused", 2, 4, zero=3) == eager.param_traffic("eager", 2, 4, zero=3)
    assert eager.param_traffic("fused", 2, 4, zero=1).fwd == 0
    # ... so a block's eager-over-fused time is the same with ZeRO-3 as with ZeRO-2 (both pay the copies)
    gaps = [_block_times(LLAMA, "eager", zero=z)[0] - _block_times(LLAMA, "fused", zero=z)[0] for z in (2, 3)]
    assert gaps[1] == pytest.approx(gaps[0], rel=1e-6)


def test_options_backends_and_specs_declare_the_stack() -> None:
    with pytest.raises(ValueError, match="elementwise"):
        CostOptions(elementwise="compiled")
    assert capabilities("megatron").cost_options()["elementwise"] == "fused"
    assert capabilities("native").cost_options()["elementwise"] == "autocast"
    assert (LLAMA.blocks[0].norm, LLAMA.blocks[0].rope) == ("rmsnorm", True)
    assert (GPT_1B.blocks[0].norm, GPT_1B.blocks[0].rope) == ("layernorm", False)
    import torch

    cfg = GPTConfig(norm="rmsnorm")
    spec = ModelSpec.from_module(GPT(cfg), torch.zeros(2, cfg.seq_len, dtype=torch.long))
    assert spec.blocks[0].norm == "rmsnorm"


def test_bias_gradients_read_each_linear_output_once() -> None:
    """GPT-3 XL's biased linears (q, k, v, out, up, down): backward reads each output gradient once
    more for its bias, one reduction kernel each; a module with biases (and RoPE) is described as such."""
    import dataclasses as dc

    block = ModelSpec.from_config("gpt3-1.3b").blocks[0]
    assert block.bias
    with_bias = eager.block_traffic(block, LayerStrategy(), "autocast", 2)
    without = eager.block_traffic(dc.replace(block, bias=False), LayerStrategy(), "autocast", 2)
    h = 2048
    assert with_bias.bwd - without.bwd == pytest.approx(2 * (3 * h + h + 4 * h + h))
    assert (with_bias.fwd, with_bias.kernels_bwd - without.kernels_bwd) == (without.fwd, 6)
    import torch

    from galvatron.runtime.apply import describe

    for bias, position in ((True, "learned"), (False, "rope")):
        model = GPT(GPTConfig(vocab=64, seq_len=16, layers=2, hidden=32, heads=4, bias=bias, position=position))
        block = describe(model, torch.zeros(2, 16, dtype=torch.long), keep_seq_len=True).blocks[0]
        assert (block.bias, block.rope) == (bias, position == "rope")


def test_rope_read_from_hugging_face_configs() -> None:
    transformers = pytest.importorskip("transformers")
    from galvatron.spec_module import _rope

    assert _rope(transformers.LlamaConfig()) and not _rope(transformers.GPT2Config())


def test_fused_projections_read_from_the_module_and_costed_as_one_linear() -> None:
    """GPT-2's ``c_attn`` (a ``Conv1D``) computes q, k and v at once and a ``gate_up_proj`` both halves
    of a gated MLP: one GEMM and, under autocast, one cast copy of the input each (2h fewer bytes kept
    per token for each reader saved), one linear fewer to issue. The reference GPT projects apart."""
    import torch
    from galvatron.strategies.cost.layer import _activation

    from galvatron.plan import Recompute
    from galvatron.runtime.apply import describe

    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                                                n_positions=16))
    block = describe(gpt2, torch.zeros(2, 16, dtype=torch.long), keep_seq_len=True).blocks[0]
    assert (block.fused_qkv, block.fused_gate_up) == (True, False)
    ours = describe(GPT(GPTConfig(vocab=64, seq_len=16, layers=2, hidden=32, heads=4, activation="swiglu",
                                  norm="rmsnorm")), torch.zeros(2, 16, dtype=torch.long), keep_seq_len=True).blocks[0]
    assert (ours.fused_qkv, ours.fused_gate_up) == (False, False)

    class GateUp(torch.nn.Module):  # a Phi-3-style MLP
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj, self.down_proj = torch.nn.Linear(32, 2 * 48), torch.nn.Linear(48, 32)

    from galvatron.spec_module import _fused_projections

    assert _fused_projections(GateUp(), 32, 0, 0) == {"fused_qkv": False, "fused_gate_up": True}

    layer = LLAMA.blocks[0]
    h = layer.hidden
    ctx = LayerContext(perf=DatasheetPerf(load_cluster("8xH100")), options=CostOptions(elementwise="autocast"),
                       dtype=DType.BF16, seq_len=LLAMA.seq_len, causal=True, micro_batch=1, stage_devices=8)
    fused = dataclasses.replace(layer, fused_qkv=True, fused_gate_up=True)
    kept = [_activation(ctx, x, LayerStrategy(), Recompute.NONE) for x in (layer, fused)]
    assert kept[0] - kept[1] == pytest.approx(2 * h * (2 + 1))
    assert eager.linears(layer) - eager.linears(fused) == 3
    assert eager.block_traffic(fused, LayerStrategy(), "autocast", 2).fwd < eager.block_traffic(
        layer, LayerStrategy(), "autocast", 2).fwd


@pytest.mark.parametrize(("options", "zero", "per_param"), [
    (CostOptions(elementwise="autocast"), 0, 4 + 2 * 4),  # fp32 gradient: the cast-back output added in
    (CostOptions(elementwise="autocast"), 1, 4 + 2 * 4),
    (CostOptions(elementwise="fused", wgrad_fp32_accumulation=False, master_weights="optimizer", grad_bytes=2),
     0, 2 + 2 * 2),  # Megatron-LM 2021: fp16 gradients added in fp16
    (CostOptions(elementwise="fused"), 0, 0),  # the GEMMs accumulate into main_grad themselves
    (CostOptions(elementwise="autocast", wgrad_fp32_accumulation=True), 0, 0),
    (CostOptions(elementwise="autocast"), 3, 0),  # FSDP2 adds the reduce-scattered shard: not charged
])
def test_gradient_accumulation_adds_are_charged_per_micro_batch(options: CostOptions, zero: int,
                                                                 per_param: int) -> None:
    """Micro-batches after the first add their weight gradients into the kept gradient (autograd's
    AccumulateGrad) unless the GEMMs accumulate: (m - 1) / m of the add per micro-batch, on the backward."""
    from galvatron.strategies.cost.layer import zero_terms

    layer = LLAMA.blocks[0]
    s = LayerStrategy(dp=8, zero=zero)
    perf = DatasheetPerf(load_cluster("8xH100"))

    def terms(m: int):
        ctx = LayerContext(perf=perf, options=options, dtype=DType.BF16, seq_len=LLAMA.seq_len, causal=True,
                           micro_batch=8, stage_devices=8, micro_batches=m)
        return zero_terms(ctx, layer, s)

    one, four = terms(1), terms(4)
    assert four.param_fwd == pytest.approx(one.param_fwd)
    params = layer.params
    assert four.param_bwd - one.param_bwd == pytest.approx(perf.streaming_time(per_param * params * 3 / 4), abs=1e-12)


def test_a_composite_rms_norm_costs_its_ops_under_autocast() -> None:
    """Under the native runtime's autocast, an RMSNorm written out in ops (``norm_composite``: Hugging
    Face's Llama) moves the composite's bytes, more than ``F.rms_norm``'s fused kernel the reference
    GPT calls; a LayerNorm block is the same either way."""
    block = LLAMA.blocks[0]
    fused = eager.block_traffic(block, LayerStrategy(), "autocast", 2)
    composite = eager.block_traffic(dataclasses.replace(block, norm_composite=True), LayerStrategy(), "autocast", 2)
    norms = 2 * (eager.rms_norm(4).fwd - eager.layer_norm(4, 4).fwd) * block.hidden
    assert composite.fwd - fused.fwd == pytest.approx(norms)
    ln = GPT_1B.blocks[0]
    assert eager.block_traffic(dataclasses.replace(ln, norm_composite=True), LayerStrategy(), "autocast", 2) == \
        eager.block_traffic(ln, LayerStrategy(), "autocast", 2)


def _hf_experts_ctx(master_weights: str, cast: bool = False) -> LayerContext:
    return LayerContext(perf=DatasheetPerf(load_cluster("8xH100")), dtype=DType.BF16, seq_len=2048, causal=True,
                        options=CostOptions(elementwise="autocast", master_weights=master_weights,
                                            cast_fused_experts=cast),
                        micro_batch=2, stage_devices=1)


def test_experts_outside_autocast_run_in_fp32_over_fp32_parameters() -> None:
    """Hugging Face's grouped_mm experts over fp32 parameters under autocast run their GEMMs in fp32
    (on one H100: 48 TFLOP/s against 759 in bf16) and never cast their weights: the block's time
    grows by about the experts' FLOPs at the fp32 rate, the held casts shrink by the experts'
    16-bit copy. Over 16-bit parameters nothing changes."""
    from galvatron.strategies.cost.layer import core_cost, zero_terms

    block = ModelSpec.from_config("mixtral-8x7b").blocks[0]
    fp32 = dataclasses.replace(block, experts_outside_autocast=True)
    s = LayerStrategy()
    ctx = _hf_experts_ctx("params")
    base, wide = core_cost(ctx, block, s), core_cost(ctx, fp32, s)
    tok = 2 * 2048
    expert_flops = 2 * tok * block.top_k * 3 * block.hidden * block.ffn_hidden  # forward, gated
    eff = 0.763  # H100 SXM: measured GEMM efficiency of the datasheet peaks (fp32 66.9, bf16 989.4 TFLOP/s)
    slower = expert_flops / (66.9e12 * eff) - expert_flops / (989.4e12 * eff)
    assert wide.fwd - base.fwd == pytest.approx(slower, rel=0.05)
    assert wide.bwd - base.bwd == pytest.approx(2 * slower, rel=0.05)
    assert wide.act > base.act  # the experts' tensors kept in fp32
    z, zf = zero_terms(ctx, block, s), zero_terms(ctx, fp32, s)
    assert z.casts - zf.casts == pytest.approx(2 * block.expert_params)
    assert zf.param_fwd < z.param_fwd  # the experts' weights are not cast
    for same in (_hf_experts_ctx("optimizer"), _hf_experts_ctx("params", cast=True)):  # 16-bit weights, or cast
        assert layer_cost(same, fp32, s).fwd == layer_cost(same, block, s).fwd
        assert zero_terms(same, fp32, s) == zero_terms(same, block, s)


def test_sliced_experts_write_a_full_gradient_per_expert() -> None:
    """An eager loop over 3-D expert weights (Hugging Face's eager experts) makes every expert's slice
    gradient a zero-filled tensor of the whole weight, the slice copied in, that autograd adds up: per
    backward ``E`` writes, one read and write in slices and ``E - 1`` adds (read two, write one) of the
    weights in their own dtype, and the running sum and the new tensor of the up projection held at
    once."""
    from galvatron.strategies.cost.layer import zero_terms

    block = ModelSpec.from_config("mixtral-8x7b").blocks[0]
    sliced = dataclasses.replace(block, experts_sliced=True)
    s = LayerStrategy()
    ctx = _hf_experts_ctx("params")
    base, more = zero_terms(ctx, block, s), zero_terms(ctx, sliced, s)
    e = block.experts
    moved = 4 * block.expert_params * (e + 2 + 3 * (e - 1))  # fills, the slices' copies, the adds
    assert more.param_bwd - base.param_bwd == pytest.approx(ctx.perf.streaming_time(moved))
    assert more.param_fwd == base.param_fwd
    assert more.work == pytest.approx(2 * 4 * block.expert_params * 2 / 3)
    cast = _hf_experts_ctx("params", cast=True)  # the stack hands the experts 16-bit copies: 16-bit gradients
    extra = zero_terms(cast, sliced, s).param_bwd - zero_terms(cast, block, s).param_bwd
    assert extra == pytest.approx(cast.perf.streaming_time(moved / 2))
