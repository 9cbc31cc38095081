"""Stage splitting without processes: who holds which parameter, and the chunks run in sequence
equal the whole model (outputs and gradients) for the reference GPT and tiny Hugging Face models.

``MODELS`` is shared with tests/dist/test_pipeline.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from galvatron.errors import PlanError
from galvatron.models.gpt import GPT, GPTConfig
from galvatron.plan import Plan
from galvatron.runtime.pipeline import StageChunk, split_stages

VOCAB, SEQ = 64, 8


@dataclass(frozen=True)
class TinyModel:
    """A model family for pipeline tests: how to build it and where its parts are."""

    build: Callable[[int], nn.Module]
    """Seeded constructor taking the number of blocks."""
    block_path: str
    input_name: str
    """Keyword of the token ids in the model's forward."""
    prefix: tuple[str, ...]
    """Modules before the blocks (first stage); everything else outside the blocks is the last's."""


def _seeded(factory: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
    def build(layers: int) -> nn.Module:
        torch.manual_seed(0)
        return factory(layers)

    return build


def _gpt(layers: int) -> nn.Module:
    return GPT(GPTConfig(layers=layers, hidden=32, heads=4, kv_heads=2, vocab=VOCAB, seq_len=SEQ,
                         activation="swiglu", norm="rmsnorm", tied_embeddings=True))


def _gpt2(layers: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=SEQ, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _llama(layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=SEQ, use_cache=False))


def _mixtral(layers: int) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=48,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                            max_position_embeddings=SEQ, num_local_experts=4,
                                            num_experts_per_tok=2, use_cache=False))


MODELS = {
    "gpt": TinyModel(_seeded(_gpt), "blocks", "tokens", ("tok_embeddings",)),
    "gpt2": TinyModel(_seeded(_gpt2), "transformer.h", "input_ids", ("transformer.wte", "transformer.wpe")),
    "llama": TinyModel(_seeded(_llama), "model.layers", "input_ids", ("model.embed_tokens",)),
    "mixtral": TinyModel(_seeded(_mixtral), "model.layers", "input_ids", ("model.embed_tokens",)),
}

SPLITS = {  # (pp, virtual_stages, layer counts per stage) over 6 blocks
    "pp2-even": (2, 1, [3, 3]),
    "pp3-uneven": (3, 1, [1, 4, 1]),
    "pp2-v2-uneven": (2, 2, [2, 1, 2, 1]),
    "pp3-edges": (3, 1, [0, 6, 0]),  # the embedding, and the norm and head, on stages of their own
    "pp2-v2-edges": (2, 2, [0, 3, 3, 0]),
}


def _plan(pp: int, v: int, split: list[int]) -> Plan:
    schedule = "interleaved-1f1b" if v > 1 else "1f1b"
    return Plan.uniform(sum(split), global_batch_size=4, num_micro_batches=pp, pp=pp, virtual_stages=v,
                        schedule=schedule, layer_split=split)


def _split_all(model: nn.Module, spec: TinyModel, plan: Plan) -> list[StageChunk]:
    """Every stage's chunk in stage order, each device group splitting its own copy of ``model``."""
    per_group = [split_stages(copy.deepcopy(model), spec.block_path, plan, k) for k in range(plan.pp)]
    return [per_group[s % plan.pp][s // plan.pp] for s in range(len(plan.stages))]


def _run_in_sequence(chunks: list[StageChunk], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = chunks[0](**inputs)
    for chunk in chunks[1:]:
        hidden = chunk(hidden, **inputs)
    return hidden


def _logits(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def _expected_stages(name: str, spec: TinyModel, plan: Plan) -> set[int]:
    if name.startswith(spec.block_path + "."):
        return {plan.stage_of(int(name[len(spec.block_path) + 1:].split(".")[0]))}
    if name.startswith(spec.prefix):
        return {0}
    return {len(plan.stages) - 1}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("model_name", MODELS)
def test_each_parameter_held_by_its_stage(model_name: str, split: str) -> None:
    spec, plan = MODELS[model_name], _plan(*SPLITS[split])
    model = spec.build(6)
    chunks = _split_all(model, spec, plan)
    holders: dict[str, set[int]] = {}
    for chunk in chunks:
        for name, _ in chunk.named_parameters():
            holders.setdefault(name, set()).add(chunk.stage_index)
    expected = {name: _expected_stages(name, spec, plan) for name, _ in model.named_parameters(remove_duplicate=False)}
    assert holders == expected


@pytest.mark.parametrize("model_name", MODELS)
def test_split_keeps_the_models_own_modules_and_frees_the_rest(model_name: str) -> None:
    spec, plan = MODELS[model_name], _plan(*SPLITS["pp2-v2-uneven"])
    model = spec.build(6)
    own = {id(p) for p in model.parameters()}
    chunks = split_stages(model, spec.block_path, plan, 1)
    chunk_params = {id(p) for chunk in chunks for p in chunk.parameters()}
    assert chunk_params <= own  # no copies
    assert {id(p) for p in model.parameters()} == chunk_params  # the model keeps only this rank's part
    blocks = model.get_submodule(spec.block_path)
    held = [i for chunk in chunks for i in chunk.layer_range]
    assert held == [2, 5]  # stages 1 and 3 of the split [2, 1, 2, 1]
    assert all(chunks[0].get_submodule(f"{spec.block_path}.{i}") is blocks[i] for i in chunks[0].layer_range)
    with pytest.raises(RuntimeError, match="held by another pipeline stage"):
        blocks[0](torch.zeros(1, SEQ, 32))


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("model_name", MODELS)
def test_chunks_in_sequence_equal_the_model(model_name: str, split: str) -> None:
    spec, plan = MODELS[model_name], _plan(*SPLITS[split])
    model = spec.build(6)
    tokens, targets = torch.randint(0, VOCAB, (2, 2, SEQ), generator=torch.Generator().manual_seed(1))
    chunks = _split_all(model, spec, plan)

    reference = _logits(model(tokens))
    F.cross_entropy(reference.flatten(0, 1), targets.flatten()).backward()
    logits = _run_in_sequence(chunks, {spec.input_name: tokens})
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()

    torch.testing.assert_close(logits, reference)
    grads: dict[int, torch.Tensor] = {}  # by reference parameter: tied copies' gradients add up
    ref_params = dict(model.named_parameters(remove_duplicate=False))
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            key = id(ref_params[name])
            grads[key] = grads.get(key, 0) + p.grad
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[id(p)], p.grad, msg=name)


def test_keyword_inputs_travel_to_every_stage() -> None:
    """An attention mask with padding reaches the later stages' prefix (the causal mask)."""
    spec, plan = MODELS["llama"], _plan(*SPLITS["pp3-uneven"])
    model = spec.build(6)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    reference = model(input_ids=tokens, attention_mask=mask).logits
    assert not torch.allclose(reference, model(input_ids=tokens).logits)
    logits = _run_in_sequence(_split_all(model, spec, plan), {"input_ids": tokens, "attention_mask": mask})
    torch.testing.assert_close(logits, reference)


def test_a_block_replaced_in_the_chunk_is_what_runs() -> None:
    spec, plan = MODELS["gpt"], _plan(*SPLITS["pp2-even"])
    model = spec.build(6)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    reference = model(tokens)
    chunks = _split_all(model, spec, plan)
    calls = []
    wrapped = checkpoint_wrapper(chunks[1].get_submodule("blocks.4"))
    wrapped.register_forward_hook(lambda *_: calls.append(1))
    chunks[1].set_submodule("blocks.4", wrapped)
    torch.testing.assert_close(_run_in_sequence(chunks, {"tokens": tokens}), reference)
    assert calls == [1]


def test_split_errors_name_the_problem() -> None:
    spec = MODELS["gpt"]
    plan = _plan(*SPLITS["pp2-even"])
    with pytest.raises(ValueError, match="has no submodule 'layers'"):
        split_stages(spec.build(6), "layers", plan, 0)
    with pytest.raises(ValueError, match=r"not an nn\.ModuleList"):
        split_stages(spec.build(6), "blocks.0", plan, 0)
    with pytest.raises(PlanError, match="covers 6 layers, blocks has 4"):
        split_stages(spec.build(4), "blocks", plan, 0)
    with pytest.raises(PlanError, match="stage index 2 is outside"):
        split_stages(spec.build(6), "blocks", plan, 2)
    model = spec.build(6)
    model.scale = nn.Parameter(torch.ones(()))
    with pytest.raises(ValueError, match=r"holds parameters \['scale'\] directly"):
        split_stages(model, "blocks", plan, 0)
    model = spec.build(6)
    model.blocks[1].mlp.up_proj.weight = model.blocks[0].mlp.up_proj.weight  # one stage: fine
    split_stages(model, "blocks", plan, 0)
    model = spec.build(6)
    model.blocks[4].mlp.up_proj.weight = model.blocks[0].mlp.up_proj.weight
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.up_proj\.weight \(stage 0\) and blocks\.4\.mlp\.up_proj"):
        split_stages(model, "blocks", plan, 0)


def test_a_forward_that_skips_the_blocks_is_reported() -> None:
    class Skipper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 8)
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.embed(tokens)

    plan = _plan(2, 1, [1, 1])
    first, = split_stages(Skipper(), "blocks", plan, 0)
    with pytest.raises(RuntimeError, match="never reached block 1"):
        first(tokens=torch.zeros(1, 4, dtype=torch.long))
    last, = split_stages(Skipper(), "blocks", plan, 1)
    with pytest.raises(RuntimeError, match="never called block 1"):
        last(torch.zeros(1, 4, 8), tokens=torch.zeros(1, 4, dtype=torch.long))


def test_stages_without_blocks_only_at_the_ends() -> None:
    """The first stage may hold the embedding alone and the last the norm and head alone; a middle
    stage without blocks, or an empty last stage of a model with nothing after its blocks, is refused."""
    spec = MODELS["gpt"]
    with pytest.raises(PlanError, match="only the first or the last stage"):
        _plan(3, 1, [3, 0, 3]).validate()
    with pytest.raises(PlanError, match="only the first or the last"):
        split_stages(spec.build(6), "blocks", _plan(3, 1, [3, 0, 3]), 0)

    class Bare(nn.Module):  # nothing with parameters after the blocks
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 8)
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x)
            return x

    with pytest.raises(PlanError, match="no module with parameters after blocks"):
        split_stages(Bare(), "blocks", _plan(2, 1, [2, 0]), 1)
    first, = split_stages(Bare(), "blocks", _plan(2, 1, [0, 2]), 0)  # the embedding alone
    tokens = torch.zeros(1, 4, dtype=torch.long)
    torch.testing.assert_close(first(tokens=tokens), first.get_submodule("embed")(tokens))
