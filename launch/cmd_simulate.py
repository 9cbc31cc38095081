"""Cost a plan, or search the best one, for a model on a cluster, without GPUs.

``galvatron simulate --model llama2-7b --cluster 8xA100-80GB --tp 2 --zero 1`` costs that uniform
plan; ``--plan FILE`` costs a plan file; with neither it searches and reports the best (``--top K``
for the K best). ``--json`` prints one JSON object. ``--backend NAME`` costs plans as that backend
runs them (its kernels, master weights, selective recomputation: ``galvatron.backends``) and
searches only plans it executes; without it, the cost model's default stack and every plan.
``--attention-kernel flash2`` costs attention on that kernel instead of the GPU's default;
``--tp-comm-overlap``, ``--overlap-p2p``, ``--fp8-scaling`` and ``--fp8-params`` describe a Megatron-Core
and Transformer Engine stack
(``--dtype fp8`` plans are costed as TE runs them: ``strategies.cost.fp8``).
``--model-profile FILE`` / ``--cluster-profile FILE`` (written by ``galvatron profile model`` /
``profile cluster``) put measured layer times and collectives in place of the datasheet's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from galvatron.backends import BACKENDS, capabilities
from galvatron.errors import ConfigError, MemoryBudgetError
from galvatron.plan import CPKind, Plan, Recompute, Schedule
from galvatron.spec import ModelSpec

TRACED_CANDIDATES = 5
"""Plans a search with ``--trace-memory`` may trace before it gives up on finding one that fits."""
ALLOCATOR_MODES = {"expandable": "expandable_segments", "default": "default"}
"""``--allocator`` choices and the trace's key for each."""
_PLAN_FLAGS = ("tp", "pp", "dp", "cp", "sp", "ep", "etp", "zero", "recompute", "micro_batch", "vpp", "schedule")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="preset name (configs/models) or model YAML")
    parser.add_argument("--cluster", required=True, help="preset name (configs/clusters) or cluster YAML")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--top", type=int, default=1, metavar="K", help="search: report the K best plans")
    parser.add_argument("--report", metavar="OUT", help="also write a visual report (.html, or .png with matplotlib)")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="cost plans as this backend runs them and search only plans it executes "
                             "(docs/backends.md); default: the cost model's default stack, every plan")
    parser.add_argument("--attention-kernel", metavar="NAME",
                        help="fused attention kernel to cost (a key of the GPU's attention_kernels in "
                             "configs/hardware: cudnn, flash2, flash3...); default: the GPU's, what PyTorch's "
                             "SDPA picks there today (FlashAttention-2 on Hopper before torch 2.10)")
    parser.add_argument("--tp-comm-overlap", action="store_true",
                        help="tensor-parallel collectives under --sp megatron overlapped with the GEMMs beside them "
                             "(Transformer Engine's userbuffers, Megatron's --tp-comm-overlap)")
    parser.add_argument("--overlap-p2p", action="store_true",
                        help="interleaved schedules: pipeline sends and receives beside the next chunk's compute "
                             "(Megatron-Core's overlap_p2p_comm)")
    parser.add_argument("--fp8-scaling", choices=["delayed", "current"],
                        help="--dtype fp8: Transformer Engine's scaling recipe (default: delayed)")
    parser.add_argument("--fp8-params", action="store_true",
                        help="--dtype fp8: the blocks' weights kept in FP8 (Megatron's --fp8-param-gather)")
    measured = parser.add_argument_group("measurements (in place of the datasheet)")
    measured.add_argument("--model-profile", metavar="FILE",
                          help="per-layer times from `galvatron profile model` (this model's layers, on the GPU of "
                               "--cluster)")
    measured.add_argument("--cluster-profile", metavar="FILE",
                          help="collectives, p2p and overlap from `galvatron profile cluster`")
    plan = parser.add_argument_group("plan (uniform; leave all out to search)")
    plan.add_argument("--plan", metavar="FILE", help="cost this plan file")
    for flag in ("tp", "pp", "dp", "cp", "ep", "vpp"):
        plan.add_argument(f"--{flag}", type=int)
    plan.add_argument("--etp", type=int, help="expert tensor parallelism of MoE layers (default: --tp); another "
                      "value folds EP over adjacent ranks (MoE Parallel Folding; needs --sp megatron when tp > 1)")
    plan.add_argument("--sp", choices=["none", "megatron", "ulysses", "ring", "striped", "hybrid"],
                      help="sequence parallelism: Megatron SP inside TP, or the context-parallel kind for --cp")
    plan.add_argument("--cp-ulysses", type=int, help="Ulysses degree inside --sp hybrid")
    plan.add_argument("--zero", type=int, choices=[0, 1, 2, 3])
    plan.add_argument("--recompute", choices=[r.value for r in Recompute])
    plan.add_argument("--offload", action="store_true", help="offload optimizer states to CPU (ZeRO >= 1)")
    plan.add_argument("--micro-batch", type=int, help="samples per micro-batch per data-parallel replica")
    plan.add_argument("--global-batch", type=int, help="samples per step (search: fixed to this)")
    plan.add_argument("--schedule", choices=[s.value for s in Schedule])
    plan.add_argument("--dtype", choices=["bf16", "fp16", "fp8"], default="bf16")
    plan.add_argument("--trace-memory", action="store_true",
                      help="also trace the plan's training steps under galvatron.wrap on fake tensors (CPU, seconds "
                           "to a minute): rank 0's allocated and reserved peaks under PyTorch's caching allocator "
                           "(the reference GPT of --model, no pp; compare with --backend native). Searching, the "
                           f"best {TRACED_CANDIDATES} plans (or --top K) are traced in order until one runs in the "
                           "GPU's usable memory under --allocator, and that plan is reported first")
    plan.add_argument("--allocator", choices=sorted(ALLOCATOR_MODES), default="expandable",
                      help="the CUDA caching allocator's mode the run will use, for --trace-memory's verdict "
                           "(default: expandable, as galvatron launch starts workers)")
    space = parser.add_argument_group("search space")
    space.add_argument("--max-tp", type=int)
    space.add_argument("--max-pp", type=int)
    space.add_argument("--no-pp", action="store_true", help="search without pipeline parallelism")
    space.add_argument("--uniform", action="store_true", help="one strategy for all layers, even split")
    space.add_argument("--cp-kinds", help="comma-separated context-parallel kinds to try (default: all)")


def apply_backend(args: argparse.Namespace, cluster: Any = None) -> None:
    """``--backend``: that backend's cost options and search restrictions on ``args``;
    ``--attention-kernel``: that kernel in the cost options (checked against ``cluster``'s GPU);
    ``--tp-comm-overlap``, ``--overlap-p2p``, ``--fp8-scaling``, ``--fp8-params``: those stack facts in them."""
    import dataclasses

    from galvatron.strategies.cost import CostOptions

    if getattr(args, "backend", None):
        caps = capabilities(args.backend)
        args.restrict, args.uniform = {"capabilities": caps.features}, args.uniform or caps.uniform
        args.cost_options = CostOptions(**caps.cost_options())
    stack: dict[str, Any] = {}
    kernel = getattr(args, "attention_kernel", None)
    if kernel:
        if cluster is not None:
            cluster.gpu.attention_efficiency(False, 128, kernel)  # ConfigError naming the GPU's kernels
        stack["attention_kernel"] = kernel
    for flag in ("tp_comm_overlap", "overlap_p2p", "fp8_params"):
        if getattr(args, flag, False):
            stack[flag] = True
    if getattr(args, "fp8_scaling", None):
        stack["fp8_scaling"] = args.fp8_scaling
    fp8_flag = "--fp8-scaling" if getattr(args, "fp8_scaling", None) else "--fp8-params" if stack.get(
        "fp8_params") else None
    if fp8_flag and not getattr(args, "plan", None) and getattr(args, "dtype", "bf16") != "fp8":
        raise ConfigError(f"{fp8_flag} describes how FP8 plans run: give --dtype fp8")
    if stack:
        base = getattr(args, "cost_options", None) or CostOptions()
        args.cost_options = dataclasses.replace(base, **stack)


def apply_profiles(args: argparse.Namespace, spec: ModelSpec, cluster: Any) -> None:
    """``--model-profile`` / ``--cluster-profile``: ``args.perf``, a ``ProfiledPerf`` over ``cluster``
    answering with the measurements (None without either), and the cost options with what the
    cluster profile measured (the overlap's interference)."""
    args.perf = None
    if not (getattr(args, "model_profile", None) or getattr(args, "cluster_profile", None)):
        return
    from galvatron.profiler.calibrate import profiled_perf
    from galvatron.profiler.schema import ClusterProfile, ModelProfile
    from galvatron.strategies.cost import CostOptions

    model = ModelProfile.load(args.model_profile) if args.model_profile else None
    measured = ClusterProfile.load(args.cluster_profile) if args.cluster_profile else None
    options = getattr(args, "cost_options", None) or CostOptions()
    args.perf = profiled_perf(cluster, model_profile=model, cluster_profile=measured, spec=spec, options=options)
    args.cost_options = args.perf.measured_options(options)


def run(args: argparse.Namespace) -> int:
    spec = ModelSpec.from_config(args.model)
    cluster = load_cluster_arg(args.cluster)
    apply_backend(args, cluster)
    apply_profiles(args, spec, cluster)
    if args.plan or any(getattr(args, f) not in (None, False) for f in _PLAN_FLAGS):
        return _simulate_one(args, spec, cluster)
    search_and_emit(args, spec, cluster)
    return 0


def search_and_emit(args: argparse.Namespace, spec: ModelSpec, cluster: Any) -> list[Any]:
    """The search, its best plans checked by ``--trace-memory``, printed; the reported plans, best first."""
    result = run_search(args, spec, cluster)
    costs, traced = checked_by_trace(args, spec, cluster, list(result.top))
    emit(args, costs, result.search_time_s, result.plans_costed, spec, cluster, traced)
    return costs


def checked_by_trace(args: argparse.Namespace, spec: ModelSpec, cluster: Any,
                     top: list[Any]) -> tuple[list[Any], dict[str, Any] | None]:
    """``--trace-memory`` after a search: the cost model ranks plans by their allocated peak, while a
    GPU must also hold what the caching allocator cannot give back (blocks split in segments that
    still hold live ones). The best plans are traced in order (:func:`trace_memory`) until one's
    least memory under ``--allocator`` (cached memory released under pressure, as the allocator does
    before it runs out) fits the usable memory; that plan goes first, the others keep their order
    (``--top K`` of them). A plan that cannot be traced (a pipeline, MoE routing) ends the walk: the
    best plan stays first. ``traced_memory`` of the chosen plan gets ``candidates``: each traced
    plan's rank in the search, step time and least memory."""
    if not args.trace_memory:
        return top[:max(args.top, 1)], None
    chosen, found, tried = 0, None, []
    for rank, cost in enumerate(top):
        try:
            traced = trace_memory(args.model, spec, cost.plan, cluster.world_size)
        except ConfigError as err:
            print(f"not traced: plan #{rank + 1}: {err}", file=sys.stderr, flush=True)
            break
        need = traced[f"least_memory_gib_{ALLOCATOR_MODES[args.allocator]}"]
        fits = need <= cost.memory_limit_gib
        tried.append({"rank": rank + 1, "step_time_s": cost.step_time_s, "least_memory_gib": need,
                      "allocator": args.allocator, "fits": fits})
        if found is None:
            found = traced
        if fits:
            chosen, found = rank, traced
            break
        print(f"plan #{rank + 1} needs {need:.1f} GiB when traced ({args.allocator} allocator), over the "
              f"{cost.memory_limit_gib:.1f} GiB usable; trying the next", file=sys.stderr, flush=True)
    if found is not None:
        found = {**found, "candidates": tried}
        if not tried[-1]["fits"]:
            hint = "PYTORCH_ALLOC_CONF=expandable_segments:True, " if args.allocator == "default" else ""
            print(f"none of the {len(tried)} traced plans fits: reporting the best plan; try {hint}a smaller "
                  "micro-batch or more memory headroom", file=sys.stderr, flush=True)
    ordered = [top[chosen], *top[:chosen], *top[chosen + 1:]]
    return ordered[:max(args.top, 1)], found


def load_cluster_arg(name: str) -> Any:
    """The ``--cluster`` argument as a Cluster (preset name or YAML)."""
    from galvatron.strategies.hardware import load_cluster

    return load_cluster(name)


def _simulate_one(args: argparse.Namespace, spec: ModelSpec, cluster: Any) -> int:
    from galvatron.strategies.cost import cost_plan

    plan = Plan.load(args.plan) if args.plan else plan_from_flags(args, spec, cluster.world_size)
    plan.validate(cluster.world_size, spec)
    if getattr(args, "backend", None):  # costed as that backend runs it: a plan it cannot run is an error
        from galvatron.backends import check_plan

        check_plan(plan, args.backend)
    cost = cost_plan(plan, spec, getattr(args, "perf", None) or cluster, getattr(args, "cost_options", None))
    traced = trace_memory(args.model, spec, plan, cluster.world_size) if args.trace_memory else None
    emit(args, [cost], None, 1, spec, cluster, traced)
    if not cost.fits:
        raise MemoryBudgetError(over_memory_message(cost))
    return 0


def plan_from_flags(args: argparse.Namespace, spec: ModelSpec, world: int) -> Plan:
    """A uniform plan from the command-line flags; ``dp`` fills the world unless given."""
    tp, pp, cp, ep = args.tp or 1, args.pp or 1, args.cp or 1, args.ep or 1
    if world % (tp * pp * cp) and args.dp is None:
        raise ConfigError(f"tp {tp} x pp {pp} x cp {cp} does not divide the cluster's {world} GPUs")
    dp = args.dp or world // (tp * pp * cp)
    kind = args.sp if args.sp not in (None, "none", "megatron") else "ulysses"
    if (args.vpp or 1) > 1 and pp == 1:
        raise ConfigError(f"--vpp {args.vpp} interleaves pipeline stages: give --pp > 1")
    if args.sp not in (None, "none", "megatron") and cp == 1:
        raise ConfigError(f"--sp {args.sp} is a kind of context parallelism: give --cp > 1 (--sp megatron is "
                          "TP's sequence parallelism)")
    u = args.cp_ulysses or (_hybrid_ulysses(spec, tp, cp) if kind == "hybrid" else 0)
    micro = args.micro_batch or 1
    global_batch = args.global_batch or micro * dp * (4 * pp if pp > 1 else 1)
    schedule = args.schedule or ("interleaved-1f1b" if (args.vpp or 1) > 1 else "1f1b")
    return Plan.uniform(
        spec.num_blocks, global_batch_size=global_batch, num_micro_batches=max(global_batch // (micro * dp), 1),
        pp=pp, virtual_stages=args.vpp or 1, schedule=schedule, dtype=args.dtype, dp=dp, tp=tp, cp=cp,
        cp_kind=CPKind(kind), cp_ulysses=u, sp=args.sp == "megatron", ep=ep, etp=args.etp or 0, zero=args.zero or 0,
        recompute=args.recompute or "none", offload=args.offload,
    )


def _hybrid_ulysses(spec: ModelSpec, tp: int, cp: int) -> int:
    heads = spec.blocks[0].heads // tp
    options = [u for u in range(cp - 1, 1, -1) if cp % u == 0 and heads % u == 0]
    if not options:
        raise ConfigError(f"--sp hybrid needs a Ulysses degree in 2..{cp - 1} dividing cp {cp} and {heads} heads")
    return options[0]


def run_search(args: argparse.Namespace, spec: ModelSpec, cluster: Any) -> Any:
    """Search with the space flags; progress goes to stderr once the search has run a second."""
    from galvatron.strategies.search import SearchOptions, search

    from galvatron.plan import DType

    start = time.perf_counter()

    def progress(text: str) -> None:
        if time.perf_counter() - start > 1.0 and not args.json:
            print(f"  ... {text}", file=sys.stderr, flush=True)

    backend = getattr(args, "backend", None)
    if backend and DType(args.dtype) not in capabilities(backend).dtypes:
        raise ConfigError(f"--dtype {args.dtype} is not executed by the {backend} backend (it runs "
                          f"{', '.join(sorted(d.value for d in capabilities(backend).dtypes))})")
    kinds = tuple(CPKind(k.strip()) for k in args.cp_kinds.split(",")) if args.cp_kinds else tuple(CPKind)
    options = SearchOptions(global_batch=args.global_batch, max_tp=args.max_tp, max_pp=1 if args.no_pp else args.max_pp,
                            uniform=args.uniform, cp_kinds=kinds, dtype=DType(args.dtype),
                            top_k=max(args.top, TRACED_CANDIDATES if args.trace_memory else 1),
                            fixed=pinned(args), progress=progress, **getattr(args, "restrict", {}))
    target = getattr(args, "perf", None) or cluster
    return search(spec, target, options, getattr(args, "cost_options", None), world_size=cluster.world_size)


def pinned(args: argparse.Namespace) -> dict[str, Any]:
    """Plan flags given to ``search`` pin those values instead of searching them."""
    out = {k: getattr(args, k) for k in ("tp", "dp", "cp", "ep", "etp", "zero", "recompute", "pp", "schedule")
           if getattr(args, k, None) is not None and k != "schedule"}
    if getattr(args, "vpp", None):
        out["vpp"] = args.vpp
    if getattr(args, "sp", None) == "megatron":
        out["sp"] = True
    elif getattr(args, "sp", None) not in (None, "none"):
        out["cp_kind"] = args.sp
    return out


def over_memory_message(cost: Any) -> str:
    """Which stage is over the device memory, by how much, and what fills it."""
    stage = max(cost.stages, key=lambda s: s.memory_gib["total"])
    parts = ", ".join(f"{k} {v:.1f}" for k, v in stage.memory_gib.items() if k != "total")
    over = cost.peak_memory_gib - cost.memory_limit_gib
    return (f"the plan needs {cost.peak_memory_gib:.1f} GiB per GPU on stage {stage.index} ({parts} GiB) but "
            f"{cost.memory_limit_gib:.1f} GiB are usable: over by {over:.1f} GiB; try ZeRO, recomputation, "
            "more tensor/pipeline parallelism or a smaller micro-batch")


def trace_memory(model: str, spec: ModelSpec, plan: Plan, world: int) -> dict[str, Any]:
    """``--trace-memory``: the plan's steps traced on fake tensors (the reference GPT of ``model``), as
    ``traced_memory`` of the JSON output."""
    from galvatron.launch.cmd_profile import gpt_config
    from galvatron.profiler.memory_trace import trace_plan

    from galvatron.models import GPT
    from galvatron.spec_config import load_model_config

    cfg = gpt_config(load_model_config(model))
    print(f"tracing the plan's steps on fake tensors as rank 0 of {world} ...", file=sys.stderr, flush=True)
    try:
        traced = trace_plan(lambda: GPT(cfg), plan, world=world, seq_len=spec.seq_len, vocab=cfg.vocab)
    except ValueError as err:
        raise ConfigError(f"--trace-memory: {err}") from None
    gib = 1 << 30
    return {"allocated_peak_gib": traced.allocated_peak / gib,
            **{f"reserved_peak_gib_{mode}": v / gib for mode, v in traced.reserved_peak.items()},
            **{f"least_memory_gib_{mode}": v / gib for mode, v in traced.least_memory.items()},
            "events": len(traced.events), "seconds": traced.seconds}


def emit(args: argparse.Namespace, costs: list[Any], search_time: float | None, costed: int, spec: ModelSpec,
         cluster: Any, traced: dict[str, Any] | None = None) -> None:
    """Print the result as JSON or as a table (and write the --report); ``traced``: the plan's
    :func:`trace_memory`."""
    if args.report:
        from galvatron.report import Report, save_report

        result = {**_json(costs[0], search_time, costed), "top": [c.to_dict() for c in costs] if len(costs) > 1 else []}
        report = Report.from_result(result, context={"model": args.model, "cluster": args.cluster})
        print(f"report: {save_report(report, args.report)}", file=sys.stderr)
    if args.json:
        out = _json(costs[0], search_time, costed)
        if len(costs) > 1:
            out["top"] = [_json(c, None, costed) for c in costs]
        if traced is not None:
            out["traced_memory"] = traced
        print(json.dumps(out, indent=2))
        return
    print(f"{spec.summary()}\n{cluster.describe()}")
    if search_time is not None:
        print(f"searched in {search_time:.2f} s, {costed} candidates costed")
    for rank, cost in enumerate(costs, 1):
        print(f"\n#{rank}: {cost.step_time_s:.3f} s/step  {cost.tokens_per_s:,.0f} tokens/s  "
              f"{cost.tflops_per_gpu:.0f} TFLOP/s/GPU  MFU {cost.mfu:.1%}  peak {cost.peak_memory_gib:.1f} "
              f"of {cost.memory_limit_gib:.1f} GiB")
        print(cost.plan.describe())
        print(_table(cost))
    for c in (traced or {}).get("candidates", []):
        print(f"traced search plan #{c['rank']} ({c['step_time_s']:.3f} s/step): needs {c['least_memory_gib']:.2f} "
              f"GiB ({c['allocator']} allocator), {'fits' if c['fits'] else 'over the usable memory'}")
    if traced is not None:
        print(f"\ntraced on fake tensors ({traced['events']} allocations, {traced['seconds']:.1f} s), rank 0: "
              f"allocated peak {traced['allocated_peak_gib']:.2f} GiB; reserved peak "
              f"{traced['reserved_peak_gib_default']:.2f} GiB (default allocator), "
              f"{traced['reserved_peak_gib_expandable_segments']:.2f} GiB (expandable segments); least memory "
              f"{traced['least_memory_gib_default']:.2f} / {traced['least_memory_gib_expandable_segments']:.2f} GiB")


def _json(cost: Any, search_time: float | None, costed: int) -> dict[str, Any]:
    out = cost.to_dict()
    out["plans_costed"] = costed
    if search_time is not None:
        out["search_time_s"] = search_time
    return out


def _table(cost: Any) -> str:
    head = (f"{'stage':>5} {'layers':>12} {'compute s':>10} {'tp':>7} {'cp':>7} {'ep':>7} {'zero':>7} {'pp':>7} "
            f"{'dp':>7} {'bubble':>8} {'mem GiB':>8} {'params':>7} {'grads':>7} {'optim':>7} {'act':>7} {'buf':>6}")
    rows = [head]
    for s in cost.stages:
        c, m = s.comm_s, s.memory_gib
        layers = ",".join(f"{a}-{b}" if b > a else "emb" if a == 0 else "head" for a, b in s.layers)
        rows.append(f"{s.index:>5} {layers:>12} {s.compute_s:>10.3f} " + " ".join(
            f"{c[k]:>7.3f}" for k in ("tp", "cp", "ep", "zero", "pp", "dp")) + f" {s.bubble_s:>8.3f} "
            f"{m['total']:>8.1f} {m['params']:>7.1f} {m['grads']:>7.1f} {m['optimizer']:>7.1f} "
            f"{m['activations']:>7.1f} {m['buffers']:>6.1f}")
    return "\n".join(rows)
