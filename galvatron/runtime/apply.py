"""``galvatron.wrap``: read a plan once and apply it to an unmodified model.

Order of application (torchtitan's): context-parallel attention cores for the whole model, then
per layer group over that group's own device mesh tensor parallelism, expert parallelism,
recomputation, re-layout hooks, data parallelism / ZeRO; the embedding and
the head get their own strategies; an FSDP2 root over everything when any range is ZeRO-2/3.
With ``pp > 1`` the model is cut into this rank's chunks first (:mod:`galvatron.runtime.pipeline`)
and the same per-group appliers run on the blocks inside them. The model stays where the user built
it (CPU or meta) while it is sharded; only this rank's part is put on the device afterwards
(:func:`place_model`).

Everything that can reject a plan (validation against the world size and the model, runtime
support, tensor-parallel plans of every block) runs on every rank before the first collective,
so a bad plan fails everywhere with the same :class:`~galvatron.errors.PlanError`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import inspect
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from galvatron.errors import GalvatronError, ModelSpecError, PlanError
from galvatron.plan import CPKind, DType, LayerStrategy, Plan, Recompute, Schedule
from galvatron.runtime import data, optim, tensor
from galvatron.runtime.mesh import Layout, ParallelDims, has_expert_layout, pipeline_groups
from galvatron.runtime.recompute import apply_recompute
from galvatron.runtime.relayout import (
    ForwardContext,
    batch_relayout,
    first_batch_size,
    install_group_relayouts,
    map_tensors,
)
from galvatron.spec import ModelSpec

DEFAULT_TIMEOUT = timedelta(minutes=10)
"""Timeout of every process group galvatron creates (a hung collective raises after it)."""

_AUTOCAST = {DType.BF16: torch.bfloat16, DType.FP16: torch.float16}


# ====================================================================== public entry point
def wrap(model: nn.Module, plan: Plan | str | Path | None = "auto", *, example_batch: Any = None,
         tp_plan: Mapping[str, str] | None = None, search_options: Any = None,
         timeout: timedelta = DEFAULT_TIMEOUT, backend: str = "native") -> nn.Module:
    """Parallelise ``model`` in place by ``plan`` and return it.

    ``plan``: a :class:`~galvatron.plan.Plan`, a plan YAML path, or ``"auto"`` / None (the plan
    file named by ``$GALVATRON_PLAN``, else the fastest plan the search finds for the live world
    size; ``search_options``: a ``SearchOptions`` for it). ``example_batch``: one global batch
    (as passed to ``model(...)``), used to describe the model and, for the search, as the global
    batch size; without it a token batch of the model's configured sequence length is assumed.
    ``tp_plan``: ``{"attn.q_proj": "colwise", ...}`` relative to a block, overriding the derived
    tensor-parallel plan. ``timeout``: of every process group created (a hung collective raises).

    Starts the default process group if needed (``torchrun`` variables, else one local process;
    NCCL with CUDA, gloo without). The result is the same module, now also a
    :class:`GalvatronModule`: ``.plan``, ``.train_step(batch, loss_fn)``, ``.optimizer(...)``,
    ``.shard_batch(batch)``, ``.cross_entropy(logits, targets)``; without a pipeline it trains with
    ``loss.backward(); opt.step()``.

    ``backend``: ``"native"`` (this runtime), ``"deepspeed"`` or ``"megatron"``; each executes
    the plan features in its capability table (:mod:`galvatron.backends`, docs/backends.md).

    Where the model is built: the whole model never has to fit on one device. A model on the CPU is
    sharded there and only this rank's shards reach the device (tensor parallelism and FSDP2 move
    each tensor they shard; what stays whole, e.g. replicated layers and buffers, moves at the end).
    A model built under ``with torch.device("meta"):`` is sharded as usual and then its local
    parameters and buffers are allocated on the device, uninitialised: load the weights afterwards
    (``galvatron.runtime.checkpoint.load(model, path)``, either format, any plan). Its
    non-persistent buffers (no checkpoint holds them, e.g. RoPE tables computed in ``__init__``) are
    recomputed by the owning module's ``init_buffers()`` method (Hugging Face rotary embeddings: by
    the model's own initialisation); without one ``wrap`` raises :class:`GalvatronError` naming the
    buffer; real tensors assigned to such buffers before ``wrap`` are kept. With ``plan="auto"`` on
    CPU workers a meta model is not profiled (the nominal CPU costs the plans). Meta models run on
    the native backend only.
    """
    if backend != "native":
        if isinstance(model, nn.Module) and _holds_meta(model):
            raise GalvatronError(f"the model is on the meta device, which only the native runtime materialises; "
                                 f"build it on the CPU for backend={backend!r}")
        from galvatron.backends import wrap_backend

        return wrap_backend(backend, model, plan, example_batch=example_batch, tp_plan=tp_plan,
                            search_options=search_options, timeout=timeout)
    if isinstance(model, GalvatronModule):
        raise GalvatronError("this model is already wrapped by galvatron.wrap; wrap the original model once")
    if isinstance(plan, (str, Path)) and str(plan) != "auto":
        plan = Plan.load(plan)
    if isinstance(plan, Plan):
        check_expert_tp(plan)  # before any process group starts
    check_meta_buffers(model)
    device = init_distributed(timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    spec = describe(model, example_batch)
    plan = resolve_plan(plan, model, spec, example_batch, search_options)
    plan.validate(world, spec)
    block_plans = check_supported(model, plan, spec, tp_plan)
    dims = ParallelDims.build(plan, rank, device.type, timeout)
    runtime = Runtime(plan, dims, spec, device)
    if plan.pp == 1:
        _apply_stage(model, runtime, model.get_submodule(spec.block_path), block_plans, first=True, last=True,
                     root=model)
        place_model(model, runtime)
    else:
        _apply_pipeline(model, runtime, block_plans)
    model.__class__ = type(f"Galvatron{type(model).__name__}", (GalvatronModule, type(model)), {})
    model._galvatron = runtime
    return model


def init_distributed(timeout: timedelta = DEFAULT_TIMEOUT) -> torch.device:
    """Start the default process group unless one exists; return this rank's device. A one-rank
    group started here for a lone process is destroyed when the process exits (a multi-rank group
    is left to the launcher: destroying it while peers exit can abort the process)."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # one local process (on a GPU too: a one-rank NCCL group)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            atexit.register(_destroy_default_group)
    if torch.cuda.is_available() and dist.get_backend() != "gloo":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _destroy_default_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def describe(model: nn.Module, example_batch: Any = None, *, keep_seq_len: bool = False) -> ModelSpec:
    """``ModelSpec.from_module`` of ``model`` on ``example_batch`` (default: a token batch of the
    configured sequence length, with ``seq_len = 0`` in the result unless ``keep_seq_len``:
    unknown, so plans are not checked against it). If the model cannot run on the meta device,
    a structural description (blocks, heads, experts; no costs) that still validates plans."""
    guessed = example_batch is None
    if guessed:
        config = getattr(model, "config", None)
        seq = next((getattr(config, n) for n in ("seq_len", "max_position_embeddings", "n_positions")
                    if isinstance(getattr(config, n, None), int)), 128)
        example_batch = torch.zeros(2, min(seq, 4096), dtype=torch.long)
    try:
        spec = ModelSpec.from_module(model, example_batch)
    except ModelSpecError as err:
        from galvatron.spec_module import structural_spec

        return structural_spec(model, str(err))
    return dataclasses.replace(spec, seq_len=0 if guessed and not keep_seq_len else spec.seq_len)


PROFILE_ENV = "GALVATRON_PROFILE"
"""``0``: ``plan="auto"`` on CPU workers costs plans on the nominal CPU of :func:`local_cluster` instead
of profiling gloo and the model first (:func:`measured_cpu_perf`): the same plan on every run."""

PLAN_ENV = "GALVATRON_PLAN"
"""Environment variable naming a plan YAML that ``plan="auto"`` runs instead of searching (what
``galvatron launch`` exports to its workers)."""


def resolve_plan(plan: Plan | str | Path | None, model: nn.Module, spec: ModelSpec, example_batch: Any,
                 search_options: Any = None, backend: str = "native") -> Plan:
    """A Plan from a Plan, a YAML path, or ``"auto"`` / None: the file named by ``$GALVATRON_PLAN``,
    else the search (imported only then) for the live world size, run on rank 0 and sent to all,
    costing plans as ``backend`` runs them."""
    if isinstance(plan, Plan):
        return plan
    if plan is not None and str(plan) != "auto":
        return Plan.load(plan)
    if os.environ.get(PLAN_ENV):
        return Plan.load(os.environ[PLAN_ENV])
    outcome: list[Any] = [None]
    gloo = None
    if (not torch.cuda.is_available() and dist.get_world_size() > 1 and search_options is None
            and backend == "native" and os.environ.get(PROFILE_ENV, "1") != "0"):
        from galvatron.profiler.cluster import GLOO_PROFILE, profile_cluster

        gloo = profile_cluster(GLOO_PROFILE, progress=False)  # every rank takes part, on the default group
    if dist.get_rank() == 0:
        try:
            if spec.seq_len == 0:  # described from a guessed batch: the search needs the length
                spec = describe(model, example_batch, keep_seq_len=True)
            measured = measured_cpu_perf(model, spec, gloo) if gloo is not None else None
            found = search_plan(spec, dist.get_world_size(), example_batch, search_options, backend=backend,
                                model=model, perf=measured)
            _announce(found, spec, measured, backend)
            outcome[0] = ("plan", found.to_dict())
        except Exception as err:  # every rank must learn of it, or the others wait in the broadcast
            outcome[0] = ("error", f"{type(err).__name__}: {err}")
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise GalvatronError(f"plan='auto': the search on rank 0 failed: {value}")
    return Plan.from_dict(value)


def _announce(plan: Plan, spec: ModelSpec, perf: Any, backend: str) -> None:
    """Say on stderr (rank 0) which plan ``plan="auto"`` picked and what the cost model predicts for it,
    as ``galvatron launch`` does, and what ``ModelSpec.from_module`` could not recognise in the model
    (``ModelSpec.notes``: the prediction is rougher there)."""
    import sys

    from galvatron.strategies.cost import cost_plan

    cluster, stack = _auto_costing(plan.world_size, perf, backend)
    cost = cost_plan(plan, spec, cluster, stack)
    notes = "".join(f"\n  note: {n}" for n in spec.notes)
    print(f"galvatron: plan='auto' picked (predicted step {cost.step_time_s:.3f} s, "
          f"{cost.peak_memory_gib:.2f} GiB per device):\n{plan.describe()}"
          + (f"\ngalvatron: describing the model:{notes}" if notes else ""), file=sys.stderr, flush=True)


def measured_cpu_perf(model: nn.Module, spec: ModelSpec, gloo: Any, max_profile_s: float = 60.0) -> Any:
    """What ``plan="auto"`` costs plans on for CPU workers (rank 0): ``gloo``, the profile of the live
    ranks' collectives (``galvatron.profiler.cluster.GLOO_PROFILE``, on the default group, every rank
    taking part), and ``model`` itself profiled here on one thread at ``spec``'s sequence length
    (``galvatron.profiler.model.cpu_worker_options``; skipped when that would take over about
    ``max_profile_s``, or when the profiler cannot run the model: the nominal compute stands), its
    times stretched by the local workers sharing the cores: a ``galvatron.profiler.ProfiledPerf``
    over :func:`local_cluster`."""
    import sys
    import time

    from galvatron.profiler.calibrate import profiled_perf, shared_cores_scale
    from galvatron.profiler.model import cpu_worker_options, profile_flops, profile_on_one_thread
    from galvatron.profiler.schema import ProfileError

    start = time.perf_counter()
    options = cpu_worker_options(spec.seq_len)
    seconds = profile_flops(spec, options) / _ONE_THREAD_FLOPS
    profile, note = None, ""
    if seconds > max_profile_s:
        note = f"; the model not profiled (about {seconds:.0f} s on one thread)"
    else:
        try:
            profile = profile_on_one_thread(model, options)
        except (ProfileError, RuntimeError, TypeError, ValueError) as err:
            note = f"; the model not profiled ({type(err).__name__}: {err})"
    world = dist.get_world_size()
    print(f"galvatron: plan='auto' on CPU workers: profiled gloo among {world} ranks"
          + ("" if profile is None else " and the model")
          + f" in {gloo.seconds + time.perf_counter() - start:.1f} s{note}", file=sys.stderr, flush=True)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return profiled_perf(local_cluster(world), model_profile=profile, cluster_profile=gloo, spec=spec,
                         compute_scale=shared_cores_scale(local, gloo))


_ONE_THREAD_FLOPS = 2e10
"""A low guess of one CPU thread's fp32 rate, for :func:`measured_cpu_perf`'s profiling-time bound."""


def search_plan(spec: ModelSpec, world: int, example_batch: Any = None, options: Any = None,
                backend: str = "native", model: nn.Module | None = None, perf: Any = None) -> Plan:
    """The search's fastest plan for ``spec`` on ``world`` local devices, costed as ``backend`` runs
    a plan; the global batch is ``example_batch``'s. Without ``options``: among the plans this
    runtime runs, and, given the ``model``, also among one-stage uniform plans with context or
    expert parallelism (which the runtime runs without a pipeline), kept when faster and accepted
    by :func:`check_supported` for this model's attention and experts. ``perf``: a measured
    ``ProfiledPerf`` (:func:`measured_cpu_perf`) to cost plans on instead of :func:`local_cluster`.
    A structural description (the model could not run on the meta device: no FLOPs, no activations)
    is refused: every plan would cost nothing."""
    if not any(layer.flops_per_token for layer in spec.blocks):
        why = next((n for n in spec.notes if "costs unknown" in n), "its blocks have no FLOPs")
        raise GalvatronError(f"cannot search a plan for {spec.name}: {why}; pass example_batch= (a batch its "
                             "forward accepts) or a plan (a Plan or a plan YAML)")
    try:
        from galvatron.strategies.search import search
    except ImportError as err:
        raise GalvatronError(f"the strategy search (galvatron.strategies.search) is not available: {err}; "
                             "pass a Plan or a plan YAML") from err
    cluster, stack = _auto_costing(world, perf, backend)
    if options is not None:
        return search(spec, cluster, options, stack, world_size=world).best.plan
    batch = first_batch_size((example_batch,), {}) if example_batch is not None else None
    runnable, wide = auto_searches(batch, torch.cuda.is_available())
    if model is None or backend != "native":
        return search(spec, cluster, runnable, stack, world_size=world).best.plan
    top = search(spec, cluster, dataclasses.replace(runnable, top_k=AUTO_CANDIDATES), stack, world_size=world).top
    best = _first_supported(model, spec, top)
    if world == 1:
        return best.plan
    try:
        other = search(spec, cluster, wide, stack, world_size=world).best
    except GalvatronError:  # nothing fits without a pipeline
        return best.plan
    if other.step_time_s >= best.step_time_s:
        return best.plan
    try:
        check_supported(model, other.plan, spec, None)
    except (PlanError, ModelSpecError):
        return best.plan
    return other.plan


AUTO_CANDIDATES = 16
"""How many of the search's best plans ``plan="auto"`` tries, fastest first, until this runtime
accepts one for the model (:func:`check_supported`: the search sees the model's shape, not its
modules, e.g. whether a vocabulary-sized ``nn.Embedding`` exists to shard)."""


def _first_supported(model: nn.Module, spec: ModelSpec, top: Sequence[Any]) -> Any:
    """The fastest of the search's ``top`` candidates that :func:`check_supported` accepts for
    ``model``; a ``PlanError`` saying why the fastest is refused when none is accepted."""
    first: PlanError | ModelSpecError | None = None
    for candidate in top:
        try:
            check_supported(model, candidate.plan, spec, None)
            return candidate
        except (PlanError, ModelSpecError) as err:
            first = first or err
    raise PlanError("plan", f"none of the search's {len(top)} best plans runs on this model; the fastest is refused: "
                    f"{first}; pass a plan instead") from first


def _auto_costing(world: int, perf: Any, backend: str) -> tuple[Any, Any]:
    """What :func:`search_plan` costs plans on and with: ``perf`` (measured) or :func:`local_cluster`,
    and :func:`auto_cost_options`."""
    cluster = perf if perf is not None else local_cluster(world)
    return cluster, auto_cost_options(cluster, backend)


def auto_cost_options(cluster: Any, backend: str = "native") -> Any:
    """The ``CostOptions`` :func:`search_plan` costs plans with on this machine: how ``backend`` runs a
    plan, what a measured ``cluster`` (a ``ProfiledPerf``) measured, and the attention kernel SDPA
    picks on this GPU."""
    from galvatron.backends import capabilities
    from galvatron.strategies.cost import CostOptions

    stack = CostOptions(**capabilities(backend).cost_options(torch.cuda.is_available()))
    if hasattr(cluster, "measured_options"):
        stack = cluster.measured_options(stack)
    if torch.cuda.is_available() and backend == "native":
        kernel = sdpa_kernel(torch.__version__, torch.backends.cudnn.version(), torch.cuda.get_device_capability())
        if kernel in cluster.gpu.attention_kernels:
            stack = dataclasses.replace(stack, attention_kernel=kernel)
    return stack


def auto_searches(global_batch: int | None, gpu: bool) -> tuple[Any, Any]:
    """The ``SearchOptions`` of :func:`search_plan`'s two searches for ``global_batch`` samples on
    GPUs or (not ``gpu``) CPU workers: the plans this runtime runs, and one-stage uniform plans with
    context or expert parallelism."""
    from galvatron.backends import capabilities
    from galvatron.strategies.search import SearchOptions

    native = capabilities("native").features
    base = dict(global_batch=global_batch, dtype=DType.BF16 if gpu else DType.FP32)
    fixed = {} if gpu else {"offload": False}
    return (SearchOptions(**base, capabilities=native, fixed=fixed),
            SearchOptions(**base, capabilities=native | _CP_EP, uniform=True, fixed={**fixed, "pp": 1}))


_CP_EP = frozenset({"ep", "etp", "cp:ulysses", "cp:ring", "cp:striped", "cp:hybrid"})
"""What the native runtime runs only without a pipeline: context and expert parallelism (with MoE
Parallel Folding, ``etp``)."""


def sdpa_kernel(torch_version: str, cudnn_version: int | None, capability: tuple[int, int]) -> str:
    """The fused kernel ``F.scaled_dot_product_attention`` runs for bf16 training on a GPU of this
    compute ``capability`` (hardware-database kernel names): cuDNN's on Hopper and Blackwell from
    torch 2.10 with cuDNN >= 9.15 (PyTorch's ``check_prefer_cudnn_attention``), FlashAttention-2
    otherwise."""
    major_minor = tuple(int(p) for p in torch_version.split("+")[0].split(".")[:2])
    if capability[0] in (9, 10) and major_minor >= (2, 10) and (cudnn_version or 0) >= 91500:
        return "cudnn"
    return "flash2"


def local_cluster(world: int) -> Any:
    """The live machines for the cost model: the hardware database's entry for this GPU, or a
    nominal CPU worker (gloo over loopback) without CUDA."""
    from galvatron.strategies.hardware import GPU, Cluster, Link, gpu_for_device, load_cluster

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or world))
    if torch.cuda.is_available():
        name = gpu_for_device(torch.cuda.get_device_name())
        return load_cluster({"gpu": name, "gpus_per_node": per_node, "nodes": max(world // per_node, 1)})
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = GPU(name="cpu", peak_tflops={"fp32": 0.05, "bf16": 0.05, "fp16": 0.05}, memory_gib=ram / world,
              hbm_gbps=10.0, matmul_efficiency=1.0, matmul_efficiency_fp8=1.0,
              attention_kernels={"sdpa": {"forward": 0.5, "backward": 0.5}}, memory_efficiency=1.0,
              kernel_overhead_us=20.0, intra_node="loopback", reserved_gib=0.5)
    loopback = Link(name="loopback-gloo", gbps=2.0, efficiency=1.0, latency_us=50.0)
    return Cluster(name=f"{world}xCPU", gpu=cpu, gpus_per_node=world, nodes=1, intra=loopback, inter=loopback,
                   nics_per_node=1)


# ====================================================================== checks before collectives
_NATIVE_TODO = "not supported by the native runtime yet"


def check_supported(model: nn.Module, plan: Plan, spec: ModelSpec,
                    tp_plan: Mapping[str, str] | None) -> dict[int, dict[str, str]]:
    """Raise :class:`PlanError` for anything this runtime cannot run; return the resolved
    tensor-parallel plan of every block whose strategy has ``tp > 1``."""
    if plan.dtype is DType.FP8:
        raise PlanError("dtype", f"fp8 is {_NATIVE_TODO}")
    strategies = [(f"stages[{i}].layers[{g.start}:{g.end}]", g.strategy) for i, s in enumerate(plan.stages)
                  for g in s.groups] + [("embedding", plan.embedding_strategy), ("head", plan.head_strategy)]
    check_expert_tp(plan)
    _check_context(model, plan, strategies)
    if plan.pp > 1:
        pipeline_groups(plan)
        _check_split_backward(plan, strategies)
    _check_edges(model, plan, spec)
    blocks = model.get_submodule(spec.block_path)
    hf_plan = tensor.hf_block_plan(model, spec.block_path)
    plans = {}
    for i, stage in enumerate(plan.stages):
        for g in stage.groups:
            path = f"stages[{i}].layers[{g.start}:{g.end}]"
            if has_expert_layout(g.strategy):
                _check_expert(blocks, g, plan, path)
            for index in range(g.start, g.end) if g.strategy.tp > 1 else ():
                block = blocks[index]
                derived = tensor.derive_block_plan(block)
                plans[index] = tensor.resolve_block_plan(block, [tp_plan, hf_plan, derived], path)
                if has_expert_layout(g.strategy):  # the routed experts are split by expert TP instead
                    plans[index] = {n: style for n, style in plans[index].items() if ".experts." not in f".{n}"}
                tensor.check_divisible(block, plans[index], g.strategy.tp, path)
    return plans


def check_expert_tp(plan: Plan) -> None:
    """An expert TP other than tp (``etp``, MoE Parallel Folding) must divide tp: this runtime keeps
    an ETP group inside one tensor-parallel group (whose ranks hold the same tokens), so an ETP
    group over data-parallel ranks (``etp > tp``) is refused."""
    from galvatron.backends import plan_strategies

    for path, s in plan_strategies(plan):
        if s.etp and s.tp % s.etp:
            raise PlanError(f"{path}.etp", f"{s.etp} does not divide tp {s.tp}: an expert TP group spanning "
                            f"data-parallel ranks is {_NATIVE_TODO}; use an etp dividing tp or backend='megatron'")


def _check_expert(blocks: nn.ModuleList, group: Any, plan: Plan, path: str) -> None:
    """Every block of an ``ep > 1`` layer group holds a recognised MoE layer; no pipeline."""
    from galvatron.runtime.expert_wrap import find_moe_layers

    if plan.pp > 1:
        raise PlanError(f"{path}.ep", f"expert parallelism inside a pipeline is {_NATIVE_TODO}")
    for index in range(group.start, group.end):
        if not find_moe_layers(blocks[index]):
            raise PlanError(f"{path}.ep", f"no MoE layer recognised in block {index} ({type(blocks[index]).__name__}):"
                            " expert parallelism needs galvatron's MoE or a transformers 5 sparse-MoE block")


def _check_split_backward(plan: Plan, strategies: list[tuple[str, LayerStrategy]]) -> None:
    """Zero bubble's split backward runs one backward pass for the input gradients and then one per
    group of weights (``torch.distributed.pipelining``'s ``stage_backward_weight``); a checkpointed
    block recomputes its forward in each (a 4-block GPT ran each block's forward 6-10 times per
    micro-batch, not 2), and PyTorch's selective checkpointing refuses the second."""
    if plan.pipeline.schedule is not Schedule.ZERO_BUBBLE:
        return
    for path, s in strategies:
        if s.recompute is not Recompute.NONE:
            raise PlanError(f"{path}.recompute", f"{s.recompute.value} recomputation under the zero-bubble schedule "
                            f"is {_NATIVE_TODO}: its split backward runs one backward pass for the input gradients "
                            "and one per group of weights, and checkpointing recomputes the forward in each; use "
                            "recompute none, or the interleaved-1f1b schedule")


def _check_context(model: nn.Module, plan: Plan, strategies: list[tuple[str, LayerStrategy]]) -> None:
    """Context parallelism runs one token split through the whole model: every layer group, the
    embedding and the head share one ``dp x cp x tp`` grid, the layers one token layout (sequence
    shards are not re-laid out between layer groups), and the model takes ``position_ids``."""
    split = [(path, s) for path, s in strategies if s.cp > 1]
    if not split:
        return
    from galvatron.runtime.context import attention_modules, sequence_layout

    first_path, first = split[0]
    if plan.pp > 1:
        raise PlanError(f"{first_path}.cp", f"context parallelism inside a pipeline is {_NATIVE_TODO}")
    for path, s in strategies:
        if (s.dp, s.cp, s.tp) != (first.dp, first.cp, first.tp):
            raise PlanError(f"{path}.cp", f"dp {s.dp} x cp {s.cp} x tp {s.tp} differs from {first_path} (dp {first.dp} "
                            f"x cp {first.cp} x tp {first.tp}): under context parallelism every layer group, the "
                            "embedding and the head need the same dp, cp and tp")
    layers = [(path, s) for path, s in split if path.startswith("stages")]
    for path, s in layers:
        if sequence_layout(s.cp_kind) != sequence_layout(layers[0][1].cp_kind):
            raise PlanError(f"{path}.cp_kind", f"{s.cp_kind.value} and {layers[0][1].cp_kind.value} lay tokens out "
                            "differently: use striped for every layer group or for none")
    if "position_ids" not in inspect.signature(type(model).forward).parameters:
        raise PlanError(f"{first_path}.cp", f"{type(model).__name__}.forward takes no position_ids: context "
                        "parallelism needs to pass each rank's global token positions")
    attention_modules(model)


def _check_edges(model: nn.Module, plan: Plan, spec: ModelSpec) -> None:
    before, after = _edge_modules(model, spec.block_path)
    emb, head = plan.embedding_strategy, plan.head_strategy
    embedding, _ = tensor.find_vocab_modules(before, spec.vocab)
    _, lm_head = tensor.find_vocab_modules(after, spec.vocab or None)
    for name, s, module in (("embedding", emb, embedding), ("head", head, lm_head)):
        if s.tp == 1:
            continue
        if module is None:
            kind = "nn.Embedding" if name == "embedding" else "nn.Linear"
            raise PlanError(f"{name}.tp", f"no vocabulary-sized {kind} found outside the blocks to make vocabulary "
                            f"parallel; use tp 1 for the {name}")
    if _tied_groups(before + after) and emb.weight_layout != head.weight_layout:
        raise PlanError("head", "the model ties its input and output embeddings: the head needs the embedding's "
                        "dp, tp, zero and offload")


def _edge_modules(model: nn.Module, block_path: str) -> tuple[list[nn.Module], list[nn.Module]]:
    """Parameter-holding modules outside the blocks registered before / after the block list."""
    from galvatron.runtime.pipeline import _outer_modules

    try:
        before, after = _outer_modules(model, block_path)
    except ValueError as err:
        raise ModelSpecError(str(err)) from None
    return [model.get_submodule(p) for p in before], [model.get_submodule(p) for p in after]


def _tied_groups(modules: list[nn.Module]) -> list[list[tuple[nn.Module, str]]]:
    """Parameters registered under several (module, name) pairs among ``modules``."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for top in modules:
        for module in top.modules():
            for name, p in module.named_parameters(recurse=False):
                if (module, name) not in owners.setdefault(id(p), []):
                    owners[id(p)].append((module, name))
    return [pairs for pairs in owners.values() if len(pairs) > 1]


def _retie(groups: list[list[tuple[nn.Module, str]]]) -> None:
    """Point every owner of a tied parameter at the first owner's (possibly new) parameter."""
    for (first, name), *rest in groups:
        for module, other in rest:
            setattr(module, other, getattr(first, name))


# ====================================================================== the runtime state
class Runtime:
    """What a wrapped model carries: the plan, its rank view, gradient sync, forward context."""

    def __init__(self, plan: Plan, dims: ParallelDims, spec: ModelSpec, device: torch.device) -> None:
        self.plan, self.dims, self.spec, self.device = plan, dims, spec, device
        self.sync = data.GradientSync()
        self.ctx = ForwardContext()
        self.data_layout = dims.data_layout
        self.embedding_layout = dims.layout(plan.embedding_strategy)
        self.entry_layout = self.embedding_layout if dims.is_first else self.data_layout
        self.runner: Any = None
        self.in_pipeline = False
        self.vocab_sharded_output = False
        """Whether a vocabulary-parallel head returns its sharded logits (inside ``train_step``,
        whose loss runs under ``loss_parallel``) or gathers them (plain calls)."""
        self.loss_fn: Callable[..., torch.Tensor] | None = None
        self.sequence: Any = None
        """The token split (``context.SequenceSplit``) under context parallelism, else None."""
        self.forward_signature: inspect.Signature | None = None
        self._to_outer: dict[Layout, Callable[[torch.Tensor], torch.Tensor]] = {}

    def enter(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Move the model's inputs to this rank's device, and from the data layout to the layout
        of the model's outer code."""
        args, kwargs = self.to_device(args), self.to_device(kwargs)
        if self.sequence is not None:
            kwargs = self.sequence.add_position_ids(self.forward_signature, args, kwargs)
        outer, batch = self.entry_layout, first_batch_size(args, kwargs)
        if outer.dp != self.data_layout.dp:
            if outer not in self._to_outer:
                self._to_outer[outer] = batch_relayout(self.dims, self.data_layout, outer)
            move = self._to_outer[outer]
            args, kwargs = map_tensors(args, move, batch), map_tensors(kwargs, move, batch)
            batch = batch * self.data_layout.dp // outer.dp
        self.ctx.reset(outer, batch)
        return args, kwargs

    def to_device(self, value: Any) -> Any:
        return map_tensors(value, lambda t: t.to(self.device, non_blocking=True))

    def autocast(self) -> contextlib.AbstractContextManager:
        low = _AUTOCAST.get(self.plan.dtype)
        return torch.autocast(self.device.type, dtype=low) if low else contextlib.nullcontext()

    def mean_over_data(self, value: torch.Tensor) -> torch.Tensor:
        """Average a per-rank scalar over the ranks holding different data."""
        value = value.detach().float().clone()
        group = self.dims.data_group(self.data_layout)
        dist.all_reduce(value, group=group)
        return value / dist.get_world_size(group)


# ====================================================================== appliers
def _apply_stage(model: nn.Module, rt: Runtime, blocks: nn.ModuleList, block_plans: dict[int, dict[str, str]], *,
                 first: bool, last: bool, root: nn.Module, stage_index: int = 0) -> None:
    """Apply one (virtual) stage: the embedding if ``first``, its layer groups, the head if
    ``last``, and an FSDP root over ``root``."""
    plan, dims = rt.plan, rt.dims
    before, after = _edge_modules(model, rt.spec.block_path)
    before, after = (before if first else []), (after if last else [])
    ties = _tied_groups(before + after)
    if first:
        apply_embedding(before, plan.embedding_strategy, rt)
    if last:
        apply_head(after, plan.head_strategy, rt)
    _retie(ties)
    shared = bool(ties) and plan.embedding_strategy.zero >= 2  # one FSDP unit for both ends
    if before and not shared:  # gradient buckets in model order: backward reaches them in reverse
        apply_data(before, plan.embedding_strategy, rt)
    groups = plan.stages[stage_index].groups
    apply_context(model, blocks, rt)
    for k, g in enumerate(groups):
        if g.start == g.end:  # a first or last stage of the embedding, or of the norm and head, alone
            continue
        nxt = dims.layout(groups[k + 1].strategy) if k + 1 < len(groups) else rt.data_layout
        apply_layer_group([blocks[i] for i in range(g.start, g.end)], g.strategy, nxt, rt,
                          {i - g.start: block_plans[i] for i in range(g.start, g.end) if i in block_plans})
    if after and not shared:
        apply_data(after, plan.head_strategy, rt)
    if shared:
        apply_data(before + after, plan.embedding_strategy, rt)
    data.apply_fsdp_root(root, dims.data_mesh(plan.head_strategy if last else plan.embedding_strategy))


def apply_embedding(modules: list[nn.Module], s: LayerStrategy, rt: Runtime) -> None:
    """Vocabulary-parallel token embedding when the embedding strategy has ``tp > 1``."""
    if s.tp > 1:
        embedding, _ = tensor.find_vocab_modules(modules, rt.spec.vocab)
        tensor.apply_vocab_parallel_embedding(embedding, rt.dims.mesh(s)["tp"])


def apply_head(modules: list[nn.Module], s: LayerStrategy, rt: Runtime) -> None:
    """Vocabulary-parallel LM head when the head strategy has ``tp > 1`` (the final norm runs on
    the gathered sequence)."""
    if s.tp > 1:
        _, head = tensor.find_vocab_modules(modules, rt.spec.vocab or None)
        tensor.apply_vocab_parallel_head(head, rt.dims.mesh(s)["tp"])
        head.register_forward_hook(lambda m, a, out: out if rt.vocab_sharded_output else out.full_tensor())


def apply_layer_group(blocks: list[nn.Module], s: LayerStrategy, next_layout: Layout, rt: Runtime,
                      block_plans: dict[int, dict[str, str]]) -> None:
    """One layer group: TP (+SP), expert parallelism, recomputation, the re-layout into ``s``'s
    layout and out to ``next_layout``, then DP / ZeRO (context parallelism: :func:`apply_context`).
    Under autocast, fused experts compute with 16-bit copies of their weights
    (:func:`galvatron.runtime.expert_wrap.apply_expert_casts`)."""
    from galvatron.runtime.expert_wrap import apply_expert_casts

    mesh = rt.dims.mesh(s)
    for i, block in enumerate(blocks):
        if s.tp > 1:
            tensor.apply_tensor_parallel(block, block_plans[i], mesh["tp"], s.sp,
                                         functional=s.recompute is Recompute.SELECTIVE)
        elif rt.plan.dtype in _AUTOCAST:
            tensor.apply_input_casts(block)
        apply_expert(block, s, rt)
        if rt.plan.dtype in _AUTOCAST:
            apply_expert_casts(block)
        apply_recompute(block, s.recompute)
    sp_group = mesh["tp"].get_group() if s.sp else None
    install_group_relayouts(blocks, rt.dims.layout(s), next_layout, sp_group=sp_group, dims=rt.dims, ctx=rt.ctx)
    apply_data(blocks, s, rt)


def apply_context(model: nn.Module, blocks: nn.ModuleList, rt: Runtime) -> None:
    """Context parallelism: every attention layer of a ``cp > 1`` layer group attends over the
    whole sequence from this rank's token shard (:mod:`galvatron.runtime.context`, one core per
    layer, with the kind of its group); the model's inputs are token shards with global
    ``position_ids`` (``rt.sequence``). No-op without context parallelism."""
    layers = [g for g in rt.plan.groups() if g.strategy.cp > 1]
    if not layers:
        return
    from galvatron.runtime.context import (
        ContextAttention,
        ContextGroups,
        SequenceSplit,
        apply_context_parallel,
        attention_modules,
    )

    dims = rt.dims

    def core(s: LayerStrategy) -> ContextAttention:
        cp, ulysses, ring = (dims.group(g) if g else None for g in dims.context_ranks(s))
        return ContextAttention(s.cp_kind, ContextGroups(cp, ulysses, ring))

    owner = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    strategies = [rt.plan.strategy_of(owner[id(m)]) if id(m) in owner else None for m in attention_modules(model)]
    apply_context_parallel(model, [core(s) if s is not None and s.cp > 1 else None for s in strategies])
    s = layers[0].strategy
    cp_ranks = dims.context_ranks(s)[0]
    rt.sequence = SequenceSplit(CPKind(s.cp_kind), s.cp, cp_ranks.index(dims.rank), dims.group(cp_ranks))
    rt.forward_signature = inspect.signature(type(model).forward)


def apply_expert(block: nn.Module, s: LayerStrategy, rt: Runtime) -> None:
    """Expert parallelism of one MoE block when ``s.ep > 1`` or ``s.etp`` is set: its routed experts
    split over an EP group and by expert TP (:mod:`galvatron.runtime.expert_wrap`, dropless), the
    reference MoE's aux loss over the ``dp x cp`` ranks. With ``etp`` 0 the EP groups fold over the
    layer's ``dp x cp`` ranks and the expert TP is its tp; with ``etp`` (MoE Parallel Folding) ETP,
    EP and expert DP take Megatron-Core's order over all its ranks and each ETP group routes its
    chunk of the sequence. Expert gradients are summed over the expert data-parallel group and
    divided by ``dp x cp`` (ZeRO-1 optimizer states over that group when ``zero >= 1``; FSDP2 leaves
    the experts alone: it reduces only parameters that have a gradient, and an expert without
    tokens has none on some ranks)."""
    if not has_expert_layout(s):
        return
    from galvatron.runtime.expert_wrap import apply_expert_parallel, expert_modules

    dims = rt.dims
    ep_ranks, edp_ranks = dims.expert_ranks(s)
    etp_ranks, chunk_ranks = dims.expert_tp_ranks(s)
    data = next(g for g in dims.layout(s).data_groups() if dims.rank in g)

    def group(ranks: tuple[int, ...]) -> dist.ProcessGroup | None:
        return dims.group(ranks) if len(ranks) > 1 else None

    apply_expert_parallel(block, group(ep_ranks), aux_group=group(data), tp_group=group(etp_ranks),
                          sequence_group=group(chunk_ranks))
    for _, experts in expert_modules(block):
        rt.sync.add(list(experts.parameters()), dims.gradient_group(edp_ranks), zero1=s.zero >= 1,
                    offload=s.offload, divide=s.dp * s.cp)


def apply_data(modules: list[nn.Module], s: LayerStrategy, rt: Runtime) -> None:
    """DP / ZeRO of ``modules`` over ``s``'s data-parallel ranks."""
    data.apply_data_parallel(modules, zero=s.zero, offload=s.offload, dp_mesh=rt.dims.data_mesh(s),
                             group=rt.dims.data_group(s), sync=rt.sync, dtype=rt.plan.dtype)


def _apply_pipeline(model: nn.Module, rt: Runtime, block_plans: dict[int, dict[str, str]]) -> None:
    """Cut ``model`` into this rank's chunks, parallelise each, and build the runner."""
    from galvatron.runtime.pipeline import PipelineRunner, split_stages

    chunks = split_stages(model, rt.spec.block_path, rt.plan, rt.dims.device_group)
    blocks = model.get_submodule(rt.spec.block_path)
    for chunk in chunks:
        _apply_stage(model, rt, blocks, block_plans, first=chunk.is_first, last=chunk.is_last, root=chunk,
                     stage_index=chunk.stage_index)
        outer = rt.embedding_layout if chunk.is_first else rt.data_layout
        chunk.register_forward_pre_hook(lambda m, a, o=outer: setattr(rt, "entry_layout", o))
    place_model(model, rt)  # the other stages' modules are placeholders now
    rt.runner = PipelineRunner(chunks, rt.plan, rt.dims.pipeline_group(), _CurrentLoss(rt), rt.device)


# ====================================================================== placement on the device
INIT_BUFFERS = "init_buffers"
"""The method :func:`wrap` calls, once a meta-device model is materialised, on each module whose
non-persistent buffers were on the meta device (no checkpoint holds those): ``module.init_buffers()``
recomputes them (e.g. rotary tables), in place or by assigning new tensors, on the module's device."""


def place_model(model: nn.Module, rt: Runtime) -> None:
    """Put this rank's part of the parallelised ``model`` on its device: meta tensors materialised
    uninitialised (their non-persistent buffers recomputed, :data:`INIT_BUFFERS`), host tensors moved,
    then the gradient hooks of materialised parameters registered. Runs after sharding, so only local
    shards reach the device: tensor parallelism (DTensor) and FSDP2 each moved the tensors they
    sharded there one at a time, and what stays whole moves now."""
    owners = [m for m in model.modules() if _meta_buffer_names(m)]
    _place_tensors(model, rt.device, data.host_parameters(model))
    with torch.no_grad():
        for owner in owners:
            _buffer_initializer(model, owner)()
    rt.sync.hook_materialized()


def _place_tensors(model: nn.Module, device: torch.device, host: set[int]) -> None:
    """Every parameter and buffer of ``model`` not on ``device`` put there (the parameters whose ids
    are in ``host`` on the CPU), each parameter staying the same object, so ties between modules and
    the references the gradient sync, FSDP2 and optimizers hold stay valid: a meta tensor becomes an
    uninitialised one (``torch.utils.swap_tensors``), a host tensor moves (``.data``); a DTensor that
    is not on the meta device is already where its sharding placed it."""
    from torch.distributed.tensor import DTensor

    done: set[int] = set()
    for module in model.modules():
        for _, p in module.named_parameters(recurse=False):
            if id(p) in done:
                continue
            done.add(id(p))
            target = torch.device("cpu") if id(p) in host else device
            if p.is_meta:
                empty = torch.empty_like(p, device=target)
                torch.utils.swap_tensors(p, nn.Parameter(empty, requires_grad=p.requires_grad))
            elif not isinstance(p, DTensor) and p.device != target:
                p.data = p.data.to(target)
        for name, b in module.named_buffers(recurse=False):
            if b.is_meta:
                setattr(module, name, torch.empty_like(b, device=device))
            elif not isinstance(b, DTensor) and b.device != device:
                setattr(module, name, b.to(device))


def _holds_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _meta_buffer_names(module: nn.Module) -> list[str]:
    """``module``'s own non-persistent buffers on the meta device that hold values (not empty)."""
    return [n for n, b in module.named_buffers(recurse=False)
            if b.is_meta and b.numel() and n in module._non_persistent_buffers_set]


def _buffer_initializer(model: nn.Module, module: nn.Module) -> Callable[[], Any] | None:
    """What recomputes ``module``'s non-persistent buffers: its :data:`INIT_BUFFERS` method, or for a
    Hugging Face rotary embedding the model's ``_init_weights(module)`` (where transformers computes
    ``inv_freq`` for a model built on the meta device); None if neither."""
    hook = getattr(module, INIT_BUFFERS, None)
    if callable(hook):
        return hook
    init = getattr(model, "_init_weights", None)
    if callable(init) and "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq"):
        return lambda: init(module)
    return None


def check_meta_buffers(model: nn.Module) -> None:
    """Raise :class:`GalvatronError` naming the non-persistent buffers on the meta device that nothing
    would recompute after materialisation (:func:`_buffer_initializer`): no checkpoint holds them."""
    missing = [f"{path}.{name}" if path else name for path, module in model.named_modules()
               for name in _meta_buffer_names(module) if _buffer_initializer(model, module) is None]
    if missing:
        raise GalvatronError(
            f"non-persistent buffer(s) {', '.join(missing)} on the meta device: no checkpoint holds them, so "
            f"they would stay uninitialised; give the module owning them an {INIT_BUFFERS}() method that "
            "recomputes them, or assign their real values to the model before galvatron.wrap")


class _CurrentLoss:
    """The loss function of the ``train_step`` in progress (the runner is built once)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _local_value(self.rt.loss_fn(output, target))


def _loss_context(rt: Runtime) -> contextlib.AbstractContextManager:
    if rt.plan.head_strategy.tp > 1:
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()
    return contextlib.nullcontext()


# ====================================================================== the wrapped model
class GalvatronModule(nn.Module):
    """Added to a wrapped model's class by :func:`wrap` (the model keeps its own class,
    parameter names and ``state_dict`` keys)."""

    _galvatron: Runtime

    @property
    def plan(self) -> Plan:
        """The plan this model runs."""
        return self._galvatron.plan

    @property
    def dp_size(self) -> int:
        """Number of data shards a step's batch is split into (the head's data parallelism)."""
        return self._galvatron.data_layout.dp

    @property
    def dp_rank(self) -> int:
        """Which data shard this rank consumes (see :meth:`shard_batch`)."""
        rt = self._galvatron
        return rt.data_layout.batch_index(rt.dims.rank)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rt = self._galvatron
        if rt.runner is not None and not rt.in_pipeline:
            raise GalvatronError("a pipeline-parallel model runs through model.train_step(batch, loss_fn)")
        args, kwargs = rt.enter(args, kwargs)
        with rt.autocast():
            return super().forward(*args, **kwargs)

    def shard_batch(self, batch: Any) -> Any:
        """This rank's data shard of a global batch: tensors split along dim 0 (samples) and,
        under context parallelism, along dim 1 (tokens) by the plan's token layout."""
        n = first_batch_size((batch,), {})
        if n % self.dp_size:
            raise ValueError(f"a batch of {n} does not split into {self.dp_size} data shards")
        batch = map_tensors(batch, lambda t: t.chunk(self.dp_size)[self.dp_rank], n)
        sequence = self._galvatron.sequence
        return batch if sequence is None else sequence.shard(batch)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Token-mean cross-entropy of this rank's samples, exact under every plan: under context
        parallelism the mean over all labelled tokens of the samples' shards on the cp ranks
        (``context.context_parallel_loss``), which a plain per-rank mean is only when every cp
        rank holds as many labelled tokens. ``logits`` (..., vocab), ``targets`` (...)."""
        sequence = self._galvatron.sequence
        if sequence is not None:
            return sequence.loss(logits, targets, ignore_index)
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index)

    def optimizer(self, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                  **kwargs: Any) -> torch.optim.Optimizer:
        """An ``optimizer_cls(self.parameters(), **kwargs)`` that shards ZeRO-1 optimizer states."""
        return optim.build_optimizer(self, optimizer_cls, self._galvatron.sync, **kwargs)

    def train_step(self, batch: tuple[Any, torch.Tensor], loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
                   ) -> torch.Tensor:
        """Forward and backward of one optimizer step on this rank's data shard.

        ``batch = (inputs, targets)``: ``inputs`` a tensor, a tuple of positional inputs or a
        dict of keyword inputs (moved to this rank's device); ``loss_fn(output, targets)``
        averages over the samples it gets.
        Splits into ``plan.num_micro_batches`` micro-batches (the pipeline schedule when
        ``pp > 1``), leaves averaged gradients in ``.grad`` and returns the step's mean loss
        over all data shards (the same on every rank). Call ``optimizer.step()`` after it.
        """
        rt = self._galvatron
        inputs, targets = rt.to_device(tuple(batch))
        rt.sync.hooks_enabled, rt.vocab_sharded_output = False, True
        try:
            if rt.runner is not None:
                loss = self._pipeline_step(inputs, targets, loss_fn)
            else:
                loss = self._local_step(inputs, targets, loss_fn)
            rt.sync.reduce()
        finally:
            rt.sync.hooks_enabled, rt.vocab_sharded_output = True, False
        return rt.mean_over_data(loss)

    def _pipeline_step(self, inputs: Any, targets: torch.Tensor, loss_fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        rt = self._galvatron
        rt.loss_fn, rt.in_pipeline = loss_fn, True
        try:
            with _loss_context(rt):  # the schedule runs the loss's backward too
                return rt.runner.step(inputs, targets)
        finally:
            rt.in_pipeline = False

    def _local_step(self, inputs: Any, targets: torch.Tensor, loss_fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        rt = self._galvatron
        n = rt.plan.num_micro_batches
        total = torch.zeros((), device=rt.device)
        for x, y in zip(_micro_batches(inputs, n), _micro_batches(targets, n), strict=True):
            args, kwargs = _call_args(x)
            with _loss_context(rt):
                loss = loss_fn(self(*args, **kwargs), y) / n
                loss.backward()
            total += _local_value(loss.detach())
        return total


def _call_args(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _micro_batches(value: Any, n: int) -> Iterator[Any]:
    batch = first_batch_size((value,), {})
    if batch % n:
        raise ValueError(f"a local batch of {batch} does not split into {n} micro-batches")
    for i in range(n):
        yield map_tensors(value, lambda t, i=i: t.chunk(n)[i], batch)


def _local_value(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t
