"""ModelSpec from configs (presets) and from live modules (reference models, tiny HF models)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from galvatron import LayerKind, ModelSpec, ModelSpecError
from galvatron.models import GPT, GPTConfig
from galvatron.paths import presets


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TestFromConfig:
    @pytest.mark.parametrize("name, expected, tolerance", [
        ("llama2-7b", 6.74e9, 0.005), ("mixtral-8x7b", 46.7e9, 0.01), ("llama3-8b", 8.03e9, 0.005),
        ("llama3-70b", 70.6e9, 0.005), ("gpt3-175b", 175e9, 0.01), ("deepseek-moe-16b", 16.4e9, 0.01),
        ("llama3-405b", 405.9e9, 0.005),
    ])
    def test_published_parameter_counts(self, name: str, expected: float, tolerance: float) -> None:
        spec = ModelSpec.from_config(name)
        assert abs(spec.params - expected) / expected < tolerance

    def test_every_preset_loads(self) -> None:
        for name in presets("models"):
            spec = ModelSpec.from_config(name)
            assert spec.num_blocks > 0 and spec.params > 0

    def test_moe_shapes(self) -> None:
        spec = ModelSpec.from_config("deepseek-moe-16b")
        kinds = [b.kind for b in spec.blocks]
        assert kinds[0] is LayerKind.ATTENTION and set(kinds[1:]) == {LayerKind.MOE}
        moe = spec.blocks[1]
        assert (moe.experts, moe.top_k, moe.shared_experts) == (64, 6, 2)
        assert 2.7e9 < spec.active_params < 2.9e9  # DeepSeek-MoE paper: 2.8B activated

    def test_bad_config(self) -> None:
        with pytest.raises(ModelSpecError, match="unknown model config key 'hiden'"):
            ModelSpec.from_config({"layers": 2, "hiden": 8, "heads": 2, "vocab": 8, "seq_len": 4})
        with pytest.raises(ModelSpecError, match="positive integer 'hidden'"):
            ModelSpec.from_config({"layers": 2, "heads": 2, "vocab": 8, "seq_len": 4})
        with pytest.raises(Exception, match="unknown model preset 'nope'"):
            ModelSpec.from_config("nope")


REFERENCE = {
    "gelu": GPTConfig(),
    "swiglu-gqa-tied": GPTConfig(activation="swiglu", norm="rmsnorm", kv_heads=2, tied_embeddings=True),
    "moe-shared-learned": GPTConfig(experts=4, shared_experts=1, position="learned", bias=True),
}


class TestFromModule:
    @pytest.mark.parametrize("name", list(REFERENCE))
    def test_reference_models_match_config(self, name: str) -> None:
        cfg = REFERENCE[name]
        model = GPT(cfg)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        spec = ModelSpec.from_module(model, torch.randint(0, cfg.vocab, (2, cfg.seq_len)))
        assert spec.num_blocks == cfg.layers and spec.block_path == "blocks"
        assert spec.params == _count(model)
        assert spec.tied_embeddings == cfg.tied_embeddings
        assert {layer.hidden for layer in spec.layers} == {cfg.hidden}  # edges too: the cost model divides by it
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights were touched"
        analytic = ModelSpec.from_config(cfg.to_model_config())
        assert spec.params == analytic.params
        for measured, formula in zip(spec.blocks, analytic.blocks):
            assert measured.kind is formula.kind
            assert measured.flops_per_token == pytest.approx(formula.flops_per_token)
            assert measured.attention_flops_per_token == pytest.approx(formula.attention_flops_per_token)
            assert (measured.heads, measured.kv_heads, measured.experts) == (
                formula.heads, formula.kv_heads, formula.experts)
            assert measured.activation_bytes_per_token > 0

    @pytest.mark.parametrize("name", ["gelu", "swiglu-gqa-tied"])
    def test_reference_blocks_cost_as_their_config(self, name: str) -> None:
        """A module's blocks as the cost model sees them match its config's at a sequence where an s x s
        score matrix would dominate: the FFN width is read off the down projection, and the saved
        bytes are counted as a GPU keeps them (fused attention and RMSNorm, GQA's K and V copies and
        SiLU's output counted once, on the module's ops), whatever the recomputation and parallelism."""
        from galvatron.strategies.cost import CostOptions, DatasheetPerf, LayerContext
        from galvatron.strategies.cost.layer import _activation
        from galvatron.strategies.hardware import load_cluster

        from galvatron.backends import capabilities
        from galvatron.plan import DType, LayerStrategy, Recompute

        cfg = dataclasses.replace(REFERENCE[name], seq_len=512)
        with torch.device("meta"):
            model = GPT(cfg)
        measured = ModelSpec.from_module(model, torch.zeros(2, cfg.seq_len, dtype=torch.long)).blocks[0]
        formula = ModelSpec.from_config(cfg.to_model_config()).blocks[0]
        assert measured.activations_measured and not formula.activations_measured
        assert measured.ffn_hidden == formula.ffn_hidden == cfg.ffn_hidden
        ctx = LayerContext(perf=DatasheetPerf(load_cluster("8xH100")),
                           options=CostOptions(**capabilities("native").cost_options(True)), dtype=DType.BF16,
                           seq_len=cfg.seq_len, causal=True, micro_batch=2, stage_devices=8)
        for mode in Recompute:
            for s in (LayerStrategy(), LayerStrategy(dp=8, zero=3), LayerStrategy(tp=2, sp=True)):
                assert _activation(ctx, measured, s, mode) == pytest.approx(
                    _activation(ctx, formula, s, mode), rel=0.02), (mode, s)

    def test_moe_blocks_read_their_expert_width_and_cost_as_their_config(self) -> None:
        """A MoE block's expert FFN width comes from an expert's down projection and its shared experts
        from the down projections beside the experts, so its GEMMs are priced by shape, as the config's
        are, under expert, tensor and data parallelism (before, by FLOPs alone)."""
        from galvatron.strategies.cost import CostOptions, DatasheetPerf, LayerContext, layer_cost
        from galvatron.strategies.hardware import load_cluster

        from galvatron.plan import DType, LayerStrategy

        cfg = dataclasses.replace(REFERENCE["moe-shared-learned"], shared_experts=2, seq_len=256)
        with torch.device("meta"):
            model = GPT(cfg)
        measured = ModelSpec.from_module(model, torch.zeros(2, cfg.seq_len, dtype=torch.long)).blocks[0]
        formula = ModelSpec.from_config(cfg.to_model_config()).blocks[0]
        assert (measured.ffn_hidden, measured.shared_experts) == (formula.ffn_hidden, formula.shared_experts) == (
            cfg.expert_ffn_hidden, 2)
        ctx = LayerContext(perf=DatasheetPerf(load_cluster("8xH100")), options=CostOptions(), dtype=DType.BF16,
                           seq_len=cfg.seq_len, causal=True, micro_batch=8, stage_devices=8)
        for s in (LayerStrategy(dp=8), LayerStrategy(dp=8, ep=4), LayerStrategy(tp=2, dp=4, ep=2)):
            a, b = layer_cost(ctx, measured, s), layer_cost(ctx, formula, s)
            assert (a.fwd, a.bwd) == pytest.approx((b.fwd, b.bwd), rel=0.02), s

    def test_moe_saved_bytes_do_not_grow_with_the_expert_count(self) -> None:
        """With balanced routing a token's saved bytes depend on top-k, not on how many experts there
        are: on meta every expert sees every token, and what the routed loop keeps around each expert
        (the expert output its routing weight multiplies) scales back with the experts' own work."""
        batch = torch.zeros(2, 64, dtype=torch.long)
        saved = []
        for experts in (4, 8):
            with torch.device("meta"):
                model = GPT(dataclasses.replace(REFERENCE["moe-shared-learned"], experts=experts, seq_len=64))
            saved.append(ModelSpec.from_module(model, batch).blocks[0].activation_bytes_per_token)
        assert saved[1] == pytest.approx(saved[0], rel=0.01)

    def test_hugging_face_moe_widths(self) -> None:
        """Mixtral's experts are 3-D tensors (transformers 5): the width is a gated expert's weights
        over 3 hidden; Qwen2-MoE's one shared FFN four experts wide counts as four shared experts."""
        transformers = pytest.importorskip("transformers")
        batch = torch.zeros(1, 16, dtype=torch.long)
        with torch.device("meta"):
            mixtral = transformers.MixtralForCausalLM(transformers.MixtralConfig(
                num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, vocab_size=96))
            qwen = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
                num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                moe_intermediate_size=48, shared_expert_intermediate_size=192, num_experts=4,
                num_experts_per_tok=2, vocab_size=96, intermediate_size=128))
        a = ModelSpec.from_module(mixtral, batch).blocks[0]
        b = ModelSpec.from_module(qwen, batch).blocks[0]
        assert (a.experts, a.ffn_hidden, a.shared_experts) == (4, 96, 0)
        assert (b.experts, b.ffn_hidden, b.shared_experts) == (4, 48, 4)

    def test_hugging_face_experts_implementation(self) -> None:
        """How transformers runs fused experts is read from their config before the meta trace
        redirects them: ``grouped_mm`` (the default) runs outside autocast, ``eager`` indexes the
        3-D weights one expert at a time; a ModuleList of experts is neither."""
        transformers = pytest.importorskip("transformers")
        batch = torch.zeros(1, 16, dtype=torch.long)
        flags = {}
        for impl in (None, "grouped_mm", "eager"):
            config = transformers.MixtralConfig(
                num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, vocab_size=96)
            if impl:
                config._experts_implementation = impl
            with torch.device("meta"):
                model = transformers.MixtralForCausalLM(config)
            block = ModelSpec.from_module(model, batch).blocks[0]
            flags[impl] = (block.experts_outside_autocast, block.experts_sliced)
            assert model.config._experts_implementation == (impl or "grouped_mm")  # the user's module untouched
        assert flags == {None: (True, False), "grouped_mm": (True, False), "eager": (False, True)}
        with torch.device("meta"):
            ours = GPT(dataclasses.replace(REFERENCE["moe-shared-learned"], seq_len=16))
        block = ModelSpec.from_module(ours, batch).blocks[0]
        assert block.experts and not (block.experts_outside_autocast or block.experts_sliced)

    def test_gqa_attention_keeps_k_and_v_at_their_own_heads(self) -> None:
        """Attention called with ``enable_gqa`` keeps K and V with their fewer heads (the GPU's fused
        kernels take them so): a block counts ``2 x 2 (q - kv)`` bytes per token less than one that
        copies them to every query head first, and the same attention FLOPs."""
        import torch.nn.functional as F

        cfg = dataclasses.replace(REFERENCE["swiglu-gqa-tied"], seq_len=256)
        with torch.device("meta"):
            copies, native = GPT(cfg), GPT(cfg)
        for block in native.blocks:
            block.attn.attention_fn = lambda q, k, v, causal: F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, enable_gqa=True)
        batch = torch.zeros(2, cfg.seq_len, dtype=torch.long)
        a, b = (ModelSpec.from_module(m, batch).blocks[0] for m in (copies, native))
        head_dim = cfg.hidden // cfg.heads
        assert a.activation_bytes_per_token - b.activation_bytes_per_token == 2 * 2 * (
            cfg.heads - cfg.kv_heads) * head_dim
        assert a.attention_flops_per_token == b.attention_flops_per_token > 0

    def test_rms_norm_written_out_in_ops_is_seen(self) -> None:
        """``nn.RMSNorm`` calls ``F.rms_norm`` (one fused kernel on a GPU); Hugging Face's ``LlamaRMSNorm``
        writes the norm out in fp32 ops, which the eager cost model prices op by op."""
        transformers = pytest.importorskip("transformers")
        cfg = REFERENCE["swiglu-gqa-tied"]
        with torch.device("meta"):
            ours = GPT(cfg)
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=96))
        assert not ModelSpec.from_module(ours, torch.zeros(2, 16, dtype=torch.long)).blocks[0].norm_composite
        assert ModelSpec.from_module(hf, torch.zeros(2, 16, dtype=torch.long)).blocks[0].norm_composite

    def test_hugging_face_models(self) -> None:
        transformers = pytest.importorskip("transformers")
        models = {
            "gpt2": (transformers.GPT2LMHeadModel(transformers.GPT2Config(
                n_layer=3, n_embd=64, n_head=4, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=0)),
                3, "transformer.h", LayerKind.ATTENTION),
            "llama": (transformers.LlamaForCausalLM(transformers.LlamaConfig(
                num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=96)), 3, "model.layers", LayerKind.ATTENTION),
            "mixtral": (transformers.MixtralForCausalLM(transformers.MixtralConfig(
                num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=96, num_local_experts=4, num_experts_per_tok=2)),
                2, "model.layers", LayerKind.MOE),
        }
        for name, (model, blocks, path, kind) in models.items():
            spec = ModelSpec.from_module(model, torch.randint(0, 96, (2, 16)))
            assert (spec.num_blocks, spec.block_path, spec.params) == (blocks, path, _count(model)), name
            assert {b.kind for b in spec.blocks} == {kind}, name
            block = spec.blocks[0]
            assert block.heads == 4 and block.hidden == 64 and block.flops_per_token > 0, name
        mixtral = ModelSpec.from_module(models["mixtral"][0], torch.randint(0, 96, (2, 16))).blocks[0]
        assert (mixtral.experts, mixtral.top_k, mixtral.kv_heads) == (4, 2, 2)
        per_expert = 3 * 64 * 128
        attention = 2 * (64 * 64 * 2 + 64 * 32 * 2)
        assert mixtral.flops_per_token == attention + 2 * 64 * 4 + 2 * 2 * per_expert

    def test_says_what_it_cannot_recognise(self) -> None:
        with pytest.raises(ModelSpecError, match=r"no nn\.ModuleList of repeated blocks"):
            ModelSpec.from_module(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 3, 4))
        with pytest.raises(ModelSpecError, match="on the meta device failed"):
            ModelSpec.from_module(GPT(GPTConfig()), torch.randn(2, 3, 5, 7))
        mlp = nn.Sequential(nn.Embedding(10, 8), nn.ModuleList([nn.Linear(8, 8) for _ in range(3)]))
        mlp.forward = lambda x: mlp[1][2](mlp[1][1](mlp[1][0](mlp[0](x))))
        spec = ModelSpec.from_module(mlp, torch.randint(0, 10, (2, 4)))
        assert [b.kind for b in spec.blocks] == [LayerKind.MLP] * 3 and spec.params == _count(mlp)
