"""Measure a model (per-layer time and memory) or the cluster (collective bandwidths).

``galvatron profile model --model gpt3-1.3b [--micro-batches 1,2,4] [--seq-lens 512,1024,2048]
[--out model_profile.yaml]`` measures one block of each kind on this device;
``galvatron profile cluster [--nproc N] [--out cluster_profile.yaml]`` measures collectives over this
machine's GPUs (or, under torchrun, over every rank) and lists the GPUs and links NVML reports;
``galvatron profile memory SNAPSHOT`` replays a recorded CUDA allocator trace through the allocator
simulator: peaks and the least memory the run needs, under either allocator mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
from collections.abc import Mapping
from typing import Any

from galvatron.errors import ConfigError
from galvatron.plan import Recompute

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="profile_command", metavar="WHAT", required=True)
    text = "per-layer forward/backward time and memory of one block of each kind, in one process"
    m = sub.add_parser("model", help=text, description=text)
    m.add_argument("--model", required=True,
                   help="preset name (configs/models) or model YAML (built as the reference GPT), or "
                        "module:attr of an nn.Module or of a function returning one (taking token ids)")
    m.add_argument("--micro-batches", type=_ints, default=(1, 2, 4), metavar="N,N,...")
    m.add_argument("--seq-lens", type=_ints, metavar="S,S,...",
                   help="default: the model's sequence length (at most 8192), its half and its quarter")
    m.add_argument("--recompute", type=_modes, default=tuple(Recompute), metavar="MODE,...",
                   help="recompute modes to measure (default: none,selective,full)")
    m.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    m.add_argument("--layers", type=int,
                   help="blocks to build for a preset/YAML model (default: the fewest holding one block of each kind)")
    m.add_argument("--device", help="cuda, cuda:1 or cpu (default: the current GPU, else CPU)")
    m.add_argument("--warmup", type=int, default=2)
    m.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median kept)")
    m.add_argument("--no-optimizer", action="store_true", help="do not time the AdamW step")
    m.add_argument("--out", default="model_profile.yaml", help="where to write the profile (YAML)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    text = "collective bandwidth/latency vs message size, compute/communication overlap, GPUs and links (NVML)"
    c = sub.add_parser("cluster", help=text, description=text)
    c.add_argument("--nproc", type=int,
                   help="processes to start here when not under torchrun (default: one per visible GPU)")
    c.add_argument("--ops", type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
                   help="collectives (default: all_reduce,all_gather,reduce_scatter,all_to_all,p2p)")
    c.add_argument("--min-bytes", type=_size, default=1 << 10, metavar="SIZE", help="smallest message (default 1K)")
    c.add_argument("--max-bytes", type=_size, default=0, metavar="SIZE",
                   help="largest message (default 1G with NCCL, 1M with gloo)")
    c.add_argument("--iters", type=int, default=5)
    c.add_argument("--warmup", type=int, default=2)
    c.add_argument("--no-overlap", action="store_true", help="skip the matmul/all-reduce interference test")
    c.add_argument("--no-pipeline", action="store_true",
                   help="skip timing the pipeline schedule's host time per action (gloo only)")
    c.add_argument("--out", default="cluster_profile.yaml", help="where to write the profile (YAML)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    text = ("replay a CUDA allocator trace (torch.cuda.memory._record_memory_history() from the process start, "
            "then torch.cuda.memory._dump_snapshot(SNAPSHOT)): allocated and reserved peaks and the least memory "
            "the run needs, with the default allocator and with expandable segments; no GPU needed")
    mem = sub.add_parser("memory", help=text, description=text)
    mem.add_argument("snapshot", help="the pickle _dump_snapshot wrote")
    mem.add_argument("--device", type=int, default=0, help="which device's trace (default 0)")
    mem.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.profile_command == "model":
        return _run_model(args)
    if args.profile_command == "memory":
        return _run_memory(args)
    return _run_cluster(args)


# ---------------------------------------------------------------------------------- memory
def _run_memory(args: argparse.Namespace) -> int:
    import json
    import pickle

    from galvatron.strategies.cost.allocator import events_from_snapshot, memory_needs

    try:
        with open(args.snapshot, "rb") as f:
            traces = pickle.load(f)["device_traces"]
        trace = traces[args.device]
    except (OSError, pickle.UnpicklingError, KeyError, IndexError, TypeError) as err:
        raise ConfigError(f"{args.snapshot}: not a CUDA memory snapshot with a trace of device {args.device} "
                          f"({type(err).__name__}: {err})") from err
    events = events_from_snapshot(trace)
    if not events:
        raise ConfigError(f"{args.snapshot}: device {args.device}'s trace holds no allocations (was "
                          "_record_memory_history() on?)")
    gib = 1 << 30
    needs = {mode: memory_needs(events, expandable_segments=expandable)
             for mode, expandable in (("default", False), ("expandable_segments", True))}
    unknown = needs["default"].stats.unpaired_frees
    out: dict[str, Any] = {"events": len(events), "frees_of_earlier_blocks": unknown, **{
        mode: {"allocated_peak_gib": n.stats.allocated_peak / gib, "reserved_peak_gib": n.stats.reserved_peak / gib,
               "least_memory_gib": n.least_memory / gib} for mode, n in needs.items()}}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.snapshot}, device {args.device}: {len(events)} allocator events")
    for mode in needs:
        r = out[mode]
        print(f"  {mode:20s} allocated peak {r['allocated_peak_gib']:7.2f} GiB  reserved peak "
              f"{r['reserved_peak_gib']:7.2f} GiB  least memory to run {r['least_memory_gib']:7.2f} GiB")
    if unknown:
        print(f"  warning: {unknown} frees of blocks allocated before the trace began; the trace did not start on "
              "an empty allocator, so these numbers are lower bounds")
    return 0


# ----------------------------------------------------------------------------------- model
def _run_model(args: argparse.Namespace) -> int:
    import torch
    from galvatron.profiler.model import ProfileOptions, profile_model, summary

    device = torch.device(args.device) if args.device else None
    model, name, notes = build_model(args.model, layers=args.layers, device=device)
    options = ProfileOptions(micro_batches=args.micro_batches, seq_lens=args.seq_lens or (), recompute=args.recompute,
                             dtype=args.dtype, warmup=args.warmup, repeats=args.repeats,
                             optimizer=not args.no_optimizer)
    profile = profile_model(model, options=options, device=device, name=name, progress=not args.quiet)
    if notes:
        profile = dataclasses.replace(profile, notes=(*notes, *profile.notes))
    path = profile.save(args.out)
    print(summary(profile))
    print(f"wrote {path}")
    return 0


def build_model(model: str, *, layers: int | None = None, device: Any = None) -> tuple[Any, str, list[str]]:
    """The module to profile, its name and notes. ``module:attr`` imports an ``nn.Module`` or a factory;
    otherwise a preset or YAML builds the reference GPT with ``layers`` blocks (default: the fewest
    that hold one block of each kind) directly on ``device``."""
    import torch
    from torch import nn

    if ":" in model and not os.path.exists(model):
        module_name, _, attr = model.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"cannot import {model!r}: {err}") from None
        built = target if isinstance(target, nn.Module) else target()
        if not isinstance(built, nn.Module):
            raise ConfigError(f"{model} gave a {type(built).__name__}, not an nn.Module")
        return built, attr, []
    from galvatron.models import GPT
    from galvatron.spec_config import load_model_config

    cfg = load_model_config(model)
    gpt = gpt_config(cfg)
    full = gpt.layers
    gpt.layers = layers or min(full, max(2, gpt.moe_every if gpt.experts else 1))
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(dev):
        built = GPT(gpt)
    notes = [f"profiled the reference GPT with {gpt.layers} of {full} blocks"] if gpt.layers != full else []
    return built, str(cfg.get("name", model)), notes


def gpt_config(cfg: Mapping[str, Any]) -> Any:
    """The reference GPT's config for a model config (``ModelSpec.from_config`` keys, same defaults as
    ``galvatron.spec_config``); ConfigError when the architecture is not one the reference GPT has."""
    from galvatron.models import GPTConfig

    if cfg.get("causal", True) is not True:
        raise ConfigError("the reference GPT is causal only; profile this model as module:attr")
    heads, hidden = cfg["heads"], cfg["hidden"]
    if cfg.get("head_dim", hidden // heads) * heads != hidden:
        raise ConfigError("the reference GPT needs head_dim * heads == hidden; profile this model as module:attr")
    swiglu = cfg.get("activation", "gelu") == "swiglu"
    values: dict[str, Any] = {
        "layers": cfg["layers"], "hidden": hidden, "heads": heads, "kv_heads": cfg.get("kv_heads"),
        "ffn_hidden": cfg.get("ffn_hidden"), "vocab": cfg["vocab"], "seq_len": cfg["seq_len"],
        "activation": "swiglu" if swiglu else "gelu",
        "norm": cfg.get("norm", "rmsnorm" if swiglu else "layernorm"),
        "bias": bool(cfg.get("bias", not swiglu)),
        "position": cfg.get("position", "rope" if swiglu else "learned"),
        "tied_embeddings": bool(cfg.get("tied_embeddings", False)),
    }
    moe = cfg.get("moe") or {}
    if moe:
        if moe.get("first_dense", 0):
            raise ConfigError("the reference GPT has no leading dense blocks (moe.first_dense); "
                              "profile this model as module:attr")
        values.update(experts=moe["experts"], top_k=moe.get("top_k", 2), expert_ffn_hidden=moe.get("ffn_hidden"),
                      shared_experts=moe.get("shared_experts", 0), moe_every=moe.get("every", 1))
    return GPTConfig(**values)


# --------------------------------------------------------------------------------- cluster
def _run_cluster(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from galvatron.profiler.cluster import ClusterOptions, profile_cluster, spawn_local, summary
    from galvatron.profiler.schema import COLLECTIVES

    options = ClusterOptions(ops=args.ops or COLLECTIVES, min_bytes=args.min_bytes, max_bytes=args.max_bytes,
                             iters=args.iters, warmup=args.warmup, overlap=not args.no_overlap,
                             pipeline=not args.no_pipeline)
    progress = not args.quiet
    started_here = False
    if not dist.is_initialized() and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
        started_here = True
    if dist.is_initialized():
        try:
            profile = profile_cluster(options, progress=progress)
            rank = dist.get_rank()
        finally:
            if started_here:
                dist.destroy_process_group()
        if rank:
            return 0
        profile.save(args.out)
    else:
        nproc = args.nproc or (torch.cuda.device_count() if torch.cuda.is_available() else 1)
        if nproc >= 2:
            profile = spawn_local(nproc, options, args.out, progress=progress)
        else:
            profile = profile_cluster(options, progress=progress)
            profile.save(args.out)
    print(summary(profile))
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------------- parsing
def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _modes(text: str) -> tuple[Recompute, ...]:
    try:
        return tuple(Recompute(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"recompute modes are {', '.join(r.value for r in Recompute)}; got {text!r}") from None


def _size(text: str) -> int:
    """``4096``, ``64K``, ``1M``, ``1G`` (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 4096, 64K, 1M or 1G, got {text!r}") from None

