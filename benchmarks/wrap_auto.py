"""``galvatron.wrap(model)`` with ``plan="auto"`` on one GPU, end to end: the plan the search picks for
the live module (described by ``ModelSpec.from_module``), its predicted step time and peak memory,
and what the steps measure.

The reference GPT of ``--model`` (built on the GPU, fp32 parameters), ``--batch`` samples of
``--seq`` tokens per step, as ``galvatron launch`` runs workers (expandable segments); ``--warmup`` (2) warm-up steps
of fused AdamW, then ``--steps`` measured: the median step time and the allocator's peak over them.
``--plan FILE`` runs that plan instead of the search's. ``--hf``: Hugging Face's ``LlamaForCausalLM`` of the
preset's shape (SDPA attention) instead of the reference GPT; ``--hf mixtral``: its ``MixtralForCausalLM``
(experts stored as 3-D tensors, run one by one, or ``--experts grouped_mm`` as one grouped GEMM per
projection). ``--layers N``: the preset with N blocks. ``--cluster``
(no GPU): only the search's pick on that cluster's first GPU and its prediction. For MoE models the
plan is also costed as ``ModelSpec.from_module`` described MoE blocks before it read their expert
width (``predicted_step_s_by_flops``: expert GEMMs priced by FLOPs alone). ``--kernels N``: after the
measured steps, two more under ``torch.profiler``, and the N kernels with the most GPU time per step
(``kernels``), with their input dtypes where the profiler records the launching op's.

    python benchmarks/wrap_auto.py --model llama3.2-1b --batch 32 --out benchmarks/results/wrap_auto.json   # GPU
    python benchmarks/wrap_auto.py --model llama3.2-1b --batch 32 --cluster 8xH100                           # CPU
    python benchmarks/wrap_auto.py --model mixtral-8x7b --layers 2 --seq 2048 --batch 2 --hf mixtral
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

GIB = 1 << 30


def _model_and_batch(model_name: str, batch: int, seq: int | None, device: str, hf: str | None = None,
                     layers: int | None = None, experts: str = "eager") -> tuple[Any, Any]:
    import dataclasses

    import torch
    from galvatron.launch.cmd_profile import gpt_config

    from galvatron.models import GPT
    from galvatron.spec_config import load_model_config

    cfg = gpt_config(load_model_config(model_name))
    cfg = dataclasses.replace(cfg, seq_len=seq or cfg.seq_len, layers=layers or cfg.layers)
    with torch.device(device):
        model = _hf_mixtral(cfg, experts) if hf == "mixtral" else _hf_llama(cfg) if hf else GPT(cfg)
    tokens = torch.randint(0, cfg.vocab, (batch, cfg.seq_len + 1), device="cpu" if device == "meta" else device)
    return model, tokens


def _hf_llama(cfg: Any) -> Any:
    """Hugging Face's Llama of the reference config's shape (RMSNorm, SwiGLU, RoPE, GQA)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.hidden // cfg.heads,
        max_position_embeddings=cfg.seq_len, tie_word_embeddings=cfg.tied_embeddings, rope_theta=500000.0,
        attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config)


def _hf_mixtral(cfg: Any, experts: str = "eager") -> Any:
    """Hugging Face's Mixtral of the reference MoE config's shape (every block MoE, no shared experts),
    its experts run by transformers' ``experts`` implementation."""
    import transformers

    if not cfg.experts or cfg.shared_experts:
        raise SystemExit("--hf mixtral needs a MoE preset without shared experts (e.g. mixtral-8x7b)")
    config = transformers.MixtralConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.expert_ffn_hidden,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden // cfg.heads, num_local_experts=cfg.experts, num_experts_per_tok=cfg.top_k,
        max_position_embeddings=cfg.seq_len, tie_word_embeddings=cfg.tied_embeddings, attn_implementation="sdpa")
    config._experts_implementation = experts
    return transformers.MixtralForCausalLM(config)


def _by_flops(spec: Any) -> Any:
    """``spec`` as ``from_module`` described MoE blocks before it read their widths (GEMMs by FLOPs)."""
    import dataclasses

    layers = tuple(dataclasses.replace(x, ffn_hidden=0, shared_experts=0) if x.experts else x for x in spec.layers)
    return dataclasses.replace(spec, layers=layers) if layers != spec.layers else None


def predict(model_name: str, batch: int, seq: int | None, cluster_name: str, hf: str | None = None,
            layers: int | None = None, experts: str = "eager") -> dict[str, Any]:
    """The search's pick for one GPU of ``cluster_name``, as ``wrap`` searches on that GPU (no CUDA here:
    the datasheet's attention kernel)."""
    from galvatron.strategies.cost import cost_plan
    from galvatron.strategies.hardware import load_cluster
    from galvatron.strategies.search import search

    from galvatron.runtime.apply import auto_cost_options, auto_searches, describe

    model, tokens = _model_and_batch(model_name, batch, seq, "meta", hf, layers, experts)
    spec = describe(model, tokens[:, :-1], keep_seq_len=True)
    one = load_cluster(cluster_name)
    one = load_cluster({"gpu": one.gpu.name, "gpus_per_node": 1, "nodes": 1})
    runnable, _ = auto_searches(batch, True)
    cost = search(spec, one, runnable, auto_cost_options(one), world_size=1).best
    out = {"plan": cost.plan.describe(), "spec_notes": list(spec.notes), "predicted_step_s": cost.step_time_s,
           "predicted_peak_gib": cost.peak_memory_gib}
    if (old := _by_flops(spec)) is not None:
        out["predicted_step_s_by_flops"] = cost_plan(cost.plan, old, one, auto_cost_options(one)).step_time_s
    return out


def measure(model_name: str, batch: int, seq: int | None, steps: int, plan: str | None = None,
            hf: str | None = None, layers: int | None = None, experts: str = "eager",
            kernels: int = 0, warmup: int = 2) -> dict[str, Any]:
    import torch
    from galvatron.profiler.memory_trace import lm_training_step
    from galvatron.strategies.cost import cost_plan

    import galvatron
    from galvatron.runtime.apply import auto_cost_options, describe, local_cluster

    model, tokens = _model_and_batch(model_name, batch, seq, "cuda", hf, layers, experts)
    spec = describe(model, tokens[:, :-1], keep_seq_len=True)
    start = time.perf_counter()
    wrapped = galvatron.wrap(model, plan=plan or "auto", example_batch=tokens[:, :-1])
    searched = time.perf_counter() - start
    cluster = local_cluster(1)
    cost = cost_plan(wrapped.plan, spec, cluster, auto_cost_options(cluster))
    out: dict[str, Any] = {"plan": wrapped.plan.describe(), "spec_notes": list(spec.notes), "wrap_s": searched,
                           "predicted_step_s": cost.step_time_s,
                           "predicted_peak_gib": cost.peak_memory_gib, "device": torch.cuda.get_device_name(),
                           "torch": torch.__version__, "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF")}
    if (old := _by_flops(spec)) is not None:
        out["predicted_step_s_by_flops"] = cost_plan(wrapped.plan, old, cluster, auto_cost_options(cluster)).step_time_s
    step = lm_training_step(wrapped, tokens)
    try:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out.update(out_of_memory=False, measured_step_s=sorted(times)[len(times) // 2],
                   measured_peak_gib=torch.cuda.max_memory_allocated() / GIB,
                   measured_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
        if kernels:
            try:
                out["kernels"] = _top_kernels(step, kernels)
            except Exception as err:  # noqa: BLE001 (the measured numbers above stand without the profile)
                out["kernels_error"] = f"{type(err).__name__}: {err}"
    except torch.OutOfMemoryError as err:
        out.update(out_of_memory=True, error=str(err).splitlines()[0])
    return out


def _top_kernels(step: Any, n: int, steps: int = 2) -> list[dict[str, Any]]:
    """The ``n`` kernels with the most GPU time per step over ``steps`` profiled steps (the first row:
    all kernels), counted as ``step_breakdown.profiled_kernels`` counts them (each kernel once, no
    user annotations), each with the ATen ops that launched it and their input shapes."""
    import torch
    from step_breakdown import profiled_kernels
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels, _ = profiled_kernels(prof, steps)
    launched_by: dict[str, dict[str, int]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CPU and event.name.startswith("aten::"):
            for k in event.kernels:
                ops = launched_by.setdefault(k.name, {})
                op = f"{event.name}{list(event.input_shapes or [])}"[:200]
                ops[op] = ops.get(op, 0) + 1
    rows = [{"kernel": name[:200], "ms_per_step": sum(times) / steps, "calls_per_step": len(times) / steps,
             "ops": dict(sorted(launched_by.get(name, {}).items(), key=lambda kv: -kv[1])[:3])}
            for name, times in kernels.items()]
    every = {"kernel": "(all kernels)", "ms_per_step": sum(r["ms_per_step"] for r in rows),
             "calls_per_step": sum(r["calls_per_step"] for r in rows)}
    return [every, *sorted(rows, key=lambda r: -r["ms_per_step"])[:n]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3.2-1b", help="model preset (the reference GPT)")
    parser.add_argument("--batch", type=int, default=32, help="samples per step")
    parser.add_argument("--seq", type=int, help="tokens per sample (default: the preset's)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps")
    parser.add_argument("--plan", help="run this plan YAML instead of the search's (plan='auto')")
    parser.add_argument("--cluster", help="no GPU: the pick for one GPU of this cluster preset")
    parser.add_argument("--hf", nargs="?", const="llama", choices=("llama", "mixtral"),
                        help="Hugging Face's LlamaForCausalLM (or MixtralForCausalLM) of the preset's shape")
    parser.add_argument("--layers", type=int, help="blocks (default: the preset's)")
    parser.add_argument("--experts", default="eager", choices=("eager", "grouped_mm", "batched_mm"),
                        help="--hf mixtral: transformers' experts implementation (default eager)")
    parser.add_argument("--warmup", type=int, default=2, help="GPU: warm-up steps before the measured ones (a MoE's "
                        "per-expert GEMM shapes change every step and are new for a hundred or so)")
    parser.add_argument("--kernels", type=int, default=0, metavar="N",
                        help="GPU: also profile two steps and report the N kernels with the most GPU time")
    parser.add_argument("--out", type=Path, help="write the result here (JSON)")
    args = parser.parse_args(argv)
    if args.cluster:
        row = predict(args.model, args.batch, args.seq, args.cluster, args.hf, args.layers, args.experts)
    else:
        os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # as galvatron launch
        row = measure(args.model, args.batch, args.seq, args.steps, args.plan, args.hf, args.layers, args.experts,
                      args.kernels, args.warmup)
    row = {"model": args.model, "hf": args.hf, "layers": args.layers, "batch": args.batch, "seq": args.seq,
           "warmup": args.warmup,
           "experts": args.experts if args.hf == "mixtral" else None, "plan_file": args.plan, **row}
    print(json.dumps(row), flush=True)
    if args.out:
        command = " ".join(["python", "benchmarks/wrap_auto.py", *(argv if argv is not None else sys.argv[1:])])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": command, **row}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
