"""Backends without processes: the capability tables, plan checks, the plan -> DeepSpeed config and
plan -> Megatron-Core settings mappings, the search restricted to a backend, and the errors."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from galvatron.backends import BACKENDS, CAPABILITIES, capabilities, check_plan
from galvatron.errors import GalvatronError, PlanError
from galvatron.plan import DType, Plan


def _plan(world: int = 4, layers: int = 4, **strategy: Any) -> Plan:
    per_copy = strategy.get("tp", 1) * strategy.get("cp", 1)
    return Plan.uniform(layers, global_batch_size=16, dtype="fp32", dp=world // per_copy, **strategy)


def _stages(stages: list[dict[str, Any]], **extra: Any) -> Plan:
    return Plan.from_dict({"global_batch_size": 16, "dtype": "fp32", "stages": stages, **extra})


# ---------------------------------------------------------------- capability tables
def test_capabilities_use_the_search_vocabulary() -> None:
    from galvatron.strategies.search import ALL_CAPABILITIES

    assert set(CAPABILITIES) == set(BACKENDS)
    for caps in CAPABILITIES.values():
        assert caps.features <= ALL_CAPABILITIES, caps.name
    with pytest.raises(GalvatronError, match="unknown backend 'jax'"):
        capabilities("jax")


@pytest.mark.parametrize(("backend", "plan", "path"), [
    ("deepspeed", _plan(tp=2), "stages[0].layers[0:4].tp"),
    ("deepspeed", _plan(tp=2, sp=True), "stages[0].layers[0:4].tp"),
    ("deepspeed", _plan(cp=2), "stages[0].layers[0:4].cp_kind"),
    ("deepspeed", _plan(ep=2), "stages[0].layers[0:4].ep"),
    ("native", _plan(tp=2, sp=True, etp=1), "stages[0].layers[0:4].etp"),
    ("deepspeed", _plan(world=2, pp=2), "stages"),
    ("deepspeed", _stages([{"devices": 4, "layers": [{"range": [0, 2], "zero": 1}, {"range": [2, 4], "zero": 3}]}]),
     "stages[0].layers[2:4].zero"),
    ("megatron", _plan(zero=3), "stages[0].layers[0:4].zero"),
    ("megatron", _plan(zero=1, offload=True), "stages[0].layers[0:4].offload"),
    ("megatron", _plan(cp=2, cp_kind="striped"), "stages[0].layers[0:4].cp_kind"),
    ("megatron", _plan(world=2, pp=2, schedule="zero-bubble"), "pipeline.schedule"),
    ("megatron", _stages([{"devices": 4, "layers": [{"range": [0, 2], "tp": 2}, {"range": [2, 4], "tp": 4}]}]),
     "stages[0].layers[2:4].dp"),  # dp 2 -> 1 comes first in field order, then tp
])
def test_check_plan_names_the_field_a_backend_does_not_execute(backend: str, plan: Plan, path: str) -> None:
    with pytest.raises(PlanError) as err:
        check_plan(plan, backend)
    assert err.value.path == path
    assert backend in str(err.value)


def test_check_plan_accepts_what_the_backends_execute() -> None:
    per_layer = _stages([{"devices": 4, "layers": [{"range": [0, 2], "zero": 3, "recompute": "full"},
                                                   {"range": [2, 4], "zero": 3}]}])
    check_plan(per_layer, "deepspeed")
    check_plan(_plan(zero=2, offload=True), "deepspeed")
    cp_kinds = _stages([{"devices": 8, "layers": [{"range": [0, 2], "tp": 2, "cp": 2, "cp_kind": "ring"},
                                                  {"range": [2, 4], "tp": 2, "cp": 2, "cp_kind": "ulysses"}]}])
    check_plan(cp_kinds, "megatron")
    check_plan(_plan(world=2, pp=2, tp=2, sp=True, zero=1, virtual_stages=2, schedule="interleaved-1f1b"),
               "megatron")


# ---------------------------------------------------------------- DeepSpeed config
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_deepspeed_config_maps_zero_offload_batches_dtype(zero: int) -> None:
    from galvatron.backends.deepspeed import deepspeed_config

    plan = Plan.from_dict({**_plan(zero=zero).to_dict(), "num_micro_batches": 2, "dtype": "bf16"})
    config = deepspeed_config(plan, 4)
    assert config["zero_optimization"] == {"stage": zero}
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (16, 2, 2)
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["gradient_clipping"] == 0.0 and config["zero_force_ds_cpu_optimizer"] is False
    if zero:
        offloaded = deepspeed_config(_plan(zero=zero, offload=True), 4)["zero_optimization"]
        assert offloaded["offload_optimizer"]["device"] == "cpu"
        assert ("offload_param" in offloaded) == (zero == 3)


def test_deepspeed_config_errors() -> None:
    from galvatron.backends.deepspeed import deepspeed_config

    with pytest.raises(PlanError, match="offload needs zero >= 1"):
        deepspeed_config(_plan(zero=0, offload=True), 4)
    with pytest.raises(PlanError, match="does not split into 4 ranks x 32 micro-batches"):
        deepspeed_config(Plan.uniform(4, global_batch_size=32, num_micro_batches=32, dp=4, dtype="fp32"), 4)


# ---------------------------------------------------------------- Megatron settings
def test_megatron_settings_full_mapping() -> None:
    from galvatron.backends.megatron import megatron_settings

    plan = Plan.from_dict({
        "global_batch_size": 32, "num_micro_batches": 4, "dtype": "bf16",
        "pipeline": {"schedule": "interleaved-1f1b", "virtual_stages": 2},
        "strategy": {"tp": 2, "sp": True, "cp": 4, "cp_kind": "hybrid", "cp_ulysses": 2, "zero": 1},
        "stages": [{"devices": 16, "layers": [2 * i, 2 * i + 2]} for i in range(4)]})
    s = megatron_settings(plan, 32)
    assert s.parallel == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                          "virtual_pipeline_model_parallel_size": 2, "context_parallel_size": 4,
                          "expert_model_parallel_size": 1, "hierarchical_context_parallel_sizes": [2, 2]}
    assert s.config["sequence_parallel"] is True and s.config["cp_comm_type"] == "a2a+p2p"
    assert s.config["bf16"] is True and s.config["params_dtype"] is torch.bfloat16
    assert s.ddp["use_distributed_optimizer"] and s.optimizer["use_distributed_optimizer"]
    assert s.optimizer["clip_grad"] == 0.0
    assert (s.dp, s.micro_batch_size, s.num_micro_batches) == (2, 4, 4)


def test_megatron_settings_count_the_embedding_and_loss_as_layers() -> None:
    """A first or last (virtual) stage one block short of the others maps to Megatron-Core's
    account_for_embedding / account_for_loss flags; any other uneven split is refused."""
    from galvatron.backends.megatron import megatron_settings

    def plan(split: list[int], v: int = 2) -> Plan:
        return Plan.uniform(sum(split), global_batch_size=8, num_micro_batches=4, pp=len(split) // v,
                            schedule="interleaved-1f1b" if v > 1 else "1f1b", virtual_stages=v, layer_split=split,
                            dp=2)

    both = megatron_settings(plan([1, 2, 2, 1]), 4).config
    assert both["account_for_embedding_in_pipeline_split"] and both["account_for_loss_in_pipeline_split"]
    first = megatron_settings(plan([3, 4], v=1), 4).config
    assert first["account_for_embedding_in_pipeline_split"] and not first["account_for_loss_in_pipeline_split"]
    alone = megatron_settings(plan([0, 1, 1, 0]), 4).config  # the embedding, and the loss, alone
    assert alone["account_for_embedding_in_pipeline_split"] and alone["account_for_loss_in_pipeline_split"]
    assert "account_for_embedding_in_pipeline_split" not in megatron_settings(plan([2, 2, 2, 2]), 4).config
    for split in ([2, 1, 1, 1], [1, 2, 1, 2], [2, 2, 2, 0]):
        with pytest.raises(PlanError, match="splits layers evenly"):
            megatron_settings(plan(split), 4)


def test_megatron_settings_per_layer_cp_and_recompute() -> None:
    from galvatron.backends.megatron import megatron_settings

    layers = [{"range": [0, 1], "cp_kind": "ring", "recompute": "full"},
              {"range": [1, 2], "cp_kind": "ulysses", "recompute": "full"},
              {"range": [2, 4], "cp_kind": "ring"}]
    plan = _stages([{"devices": 4, "layers": layers}], strategy={"cp": 4})
    s = megatron_settings(plan, 4)
    assert s.config["cp_comm_type"] == ["p2p", "a2a", "p2p", "p2p"]
    assert (s.config["recompute_granularity"], s.config["recompute_method"], s.config["recompute_num_layers"]) == \
        ("full", "block", 2)
    assert megatron_settings(_plan(recompute="full"), 4).config["recompute_method"] == "uniform"
    assert megatron_settings(_plan(recompute="selective"), 4).config["recompute_granularity"] == "selective"
    assert "recompute_granularity" not in megatron_settings(_plan(ep=2, zero=0), 4).config
    assert megatron_settings(_plan(ep=2), 4).parallel["expert_model_parallel_size"] == 2
    assert "expert_tensor_parallel_size" not in megatron_settings(_plan(tp=2, sp=True, ep=2), 4).parallel
    folded = megatron_settings(_plan(tp=2, sp=True, ep=4, etp=1), 4)
    assert (folded.parallel["expert_tensor_parallel_size"], folded.config["expert_tensor_parallel_size"]) == (1, 1)


@pytest.mark.parametrize(("plan", "message"), [
    (_stages([{"devices": 4, "layers": [{"range": [0, 2], "recompute": "full"}, {"range": [2, 4],
                                                                                 "recompute": "selective"}]}]),
     "selectively or fully"),
    (_stages([{"devices": 4, "layers": [{"range": [0, 2]}, {"range": [2, 4], "recompute": "full"}]}]),
     "first layers of a stage only"),
    (_stages([{"devices": 2, "layers": [0, 1]}, {"devices": 2, "layers": [1, 4]}]), "evenly"),
])
def test_megatron_settings_refuse_what_megatron_cannot_express(plan: Plan, message: str) -> None:
    from galvatron.backends.megatron import megatron_settings

    with pytest.raises(PlanError, match=message):
        megatron_settings(plan, 4)


def test_megatron_settings_build_a_real_transformer_config() -> None:
    pytest.importorskip("megatron.core")
    import dataclasses

    from megatron.core.transformer import TransformerConfig

    from galvatron.backends.megatron import megatron_settings

    layers = [{"range": [0, 2], "cp_kind": "ring", "recompute": "full"}, {"range": [2, 4], "cp_kind": "ulysses"}]
    plan = _stages([{"devices": 8, "layers": layers}], strategy={"cp": 2, "tp": 2, "sp": True, "zero": 1})
    base = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=8, use_cpu_initialization=True)
    config = dataclasses.replace(base, **megatron_settings(plan, 8).config)
    assert (config.tensor_model_parallel_size, config.context_parallel_size, config.sequence_parallel) == (2, 2, True)
    assert config.cp_comm_type == ["p2p", "p2p", "a2a", "a2a"] and config.recompute_method == "block"


def test_megatron_backend_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    import galvatron

    with pytest.raises(GalvatronError, match="CUDA GPUs only"):
        galvatron.wrap(object(), _plan(world=1), backend="megatron")


def test_megatron_optimizer_settings() -> None:
    from galvatron.backends.megatron import optimizer_settings

    adam = optimizer_settings(torch.optim.AdamW, {"lr": 3e-4, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0})
    assert adam == {"lr": 3e-4, "optimizer": "adam", "weight_decay": 0, "adam_beta1": 0.8, "adam_beta2": 0.95,
                    "adam_eps": 1e-6}
    assert optimizer_settings(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})["sgd_momentum"] == 0.9
    with pytest.raises(GalvatronError, match="not Adagrad"):
        optimizer_settings(torch.optim.Adagrad, {})
    with pytest.raises(GalvatronError, match="amsgrad"):
        optimizer_settings(torch.optim.AdamW, {"amsgrad": True})


def test_megatron_weight_copy_matches_the_reference_gpt_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's weight copy: Megatron's GPTModel (local spec, GQA) computes the reference
    GPT's logits and loss. Megatron is GPU only; three CUDA-only lines are patched for this check."""
    pytest.importorskip("megatron.core")
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as megatron_random

    from galvatron.models.gpt import GPT

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import megatron_backend as bench

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(fused_softmax, "get_default_causal_mask",
                        lambda sq: torch.triu(torch.ones(sq, sq), diagonal=1).bool())
    monkeypatch.setattr(megatron_random.CudaRNGStatesTracker, "fork", lambda self, *a, **k: contextlib.nullcontext())
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel()
        args = type("Args", (), {"vocab": 128, "seq": 16, "layers": 2, "hidden": 64, "heads": 8, "kv_heads": 4,
                                 "ffn": 96, "batch": 2, "steps": 1})()
        cfg = bench.gpt_config(args)
        torch.manual_seed(0)
        gpt = GPT(cfg)
        import dataclasses

        spec = bench.megatron_model(cfg)
        model = spec.build(dataclasses.replace(spec.config, use_cpu_initialization=True, perform_initialization=False),
                           True, True, None)
        bench.load_megatron(model, bench.megatron_state(gpt))
        tokens, labels = bench.batches(args)[0]
        positions = torch.arange(args.seq).expand_as(tokens)
        with torch.no_grad():
            ours, theirs = gpt(tokens), model(tokens, positions, None)
            per_token = model(tokens, positions, None, labels=labels)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_token.mean(), F.cross_entropy(ours.flatten(0, 1), labels.flatten()))
    finally:
        parallel_state.destroy_model_parallel()
        if started:
            dist.destroy_process_group()


# ---------------------------------------------------------------- search restricted to a backend
def test_search_for_deepspeed_stays_in_its_table_and_offloads_when_memory_demands() -> None:
    from galvatron.strategies.hardware import load_cluster
    from galvatron.strategies.search import SearchOptions, search

    from galvatron.spec import ModelSpec

    spec = ModelSpec.from_config("llama2-7b")
    options = SearchOptions(global_batch=8, **capabilities("deepspeed").search_options())
    best = search(spec, load_cluster({"gpu": "A100-40GB", "gpus_per_node": 2, "nodes": 1}), options).best.plan
    check_plan(best, "deepspeed")
    strategy = best.embedding_strategy
    assert strategy.zero >= 2 and strategy.offload  # 7B with Adam needs ~112 GB in states


@pytest.mark.parametrize("backend", ["deepspeed", "megatron"])
def test_cli_search_backend_writes_a_plan_the_backend_accepts(backend: str, tmp_path: Path) -> None:
    from galvatron.launch.cli import main

    out = tmp_path / "plan.yaml"
    args = ["search", "--model", "llama2-7b", "--cluster", "8xA100-80GB", "--global-batch", "64", "--backend",
            backend, "--json", "--out", str(out)]
    assert main(args) == 0
    plan = Plan.load(out)
    check_plan(plan, backend)
    assert plan.pp == 1 or backend == "megatron"


def test_native_runtime_refuses_expert_tp_across_data_ranks_before_any_process_group(tmp_path: Path) -> None:
    """The native runtime runs etp dividing tp (MoE Parallel Folding inside a TP group); a plan (object or
    YAML) whose ETP group would span data-parallel ranks is refused, naming the field, before galvatron.wrap
    starts a process group. Its pipeline search table offers neither ep nor etp (the one-stage search does)."""
    import torch.distributed as dist

    import galvatron

    started = dist.is_available() and dist.is_initialized()
    plan = _plan(ep=2, etp=2)
    path = tmp_path / "plan.yaml"
    plan.save(path)
    for given in (plan, path):
        with pytest.raises(PlanError, match=r"^stages\[0\]\.layers\[0:4\]\.etp: 2 does not divide tp 1"):
            galvatron.wrap(torch.nn.Linear(2, 2), given)
    assert (dist.is_available() and dist.is_initialized()) == started
    assert not {"ep", "etp"} & capabilities("native").features


def test_native_one_stage_search_offers_expert_tp_the_runtime_accepts() -> None:
    """plan='auto' widens the native search to one-stage plans with cp / ep / etp (apply._CP_EP): with tp 2
    pinned its best plans for a MoE GPT on 4 CPU ranks include MoE Parallel Folding (tp2+sp, etp 1), and
    check_supported (what plan='auto' runs on a found plan) accepts the fastest of them."""
    from galvatron.strategies.cost import CostOptions
    from galvatron.strategies.search import SearchOptions, search

    from galvatron.models import GPT, GPTConfig
    from galvatron.runtime.apply import _CP_EP, check_supported, describe, local_cluster

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=256, seq_len=64, layers=4, hidden=64, heads=4, experts=8, top_k=2,
                          expert_ffn_hidden=256))
    spec = describe(model, torch.zeros(8, 64, dtype=torch.long), keep_seq_len=True)
    options = SearchOptions(global_batch=8, dtype=DType.FP32, capabilities=capabilities("native").features | _CP_EP,
                            uniform=True, fixed={"pp": 1, "tp": 2, "offload": False}, top_k=8)
    stack = CostOptions(**capabilities("native").cost_options(accelerator=False))
    top = search(spec, local_cluster(4), options, stack, world_size=4).top
    folding = [c.plan for c in top if {(g.strategy.sp, g.strategy.etp) for g in c.plan.groups()} == {(True, 1)}]
    assert folding, [c.plan.describe() for c in top]
    check_supported(model, folding[0], spec, None)


def test_native_search_costs_the_attention_kernel_sdpa_picks() -> None:
    from galvatron.runtime.apply import sdpa_kernel

    assert sdpa_kernel("2.11.0+cu130", 91900, (9, 0)) == "cudnn"  # the GPU machines here
    assert sdpa_kernel("2.6.0.dev20241204+cu124", 90100, (9, 0)) == "flash2"  # torchtitan's Dec 2024 runs
    assert sdpa_kernel("2.11.0", 90800, (9, 0)) == "flash2"  # cuDNN too old for PyTorch to prefer it
    assert sdpa_kernel("2.11.0", 91900, (8, 0)) == "flash2"  # Ampere
    assert sdpa_kernel("2.12.0a0+git1234", 91900, (10, 0)) == "cudnn"


def test_eager_backends_declare_a_host_side_on_accelerators_only() -> None:
    assert capabilities("native").cost_options()["host_us_per_kernel"] > 0
    assert capabilities("native").cost_options(accelerator=False)["host_us_per_kernel"] == 0
    assert capabilities("megatron").cost_options()["host_us_per_kernel"] == 0
