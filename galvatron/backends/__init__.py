"""Execution backends behind the one plan: ``native`` (galvatron's own runtime, the default),
``deepspeed`` (ZeRO 0-3 and ZeRO-Offload through ``deepspeed.initialize``) and ``megatron``
(Megatron-Core models: TP, PP with virtual stages, CP, EP, distributed optimizer; GPU only).

``galvatron.wrap(model, plan, backend="deepspeed")`` runs a plan on another stack. Each backend
has a capability table (:data:`CAPABILITIES`): the plan features it executes, in the search's
vocabulary (``SearchOptions.capabilities``), so ``galvatron search --backend X`` only proposes
plans X can run, and :func:`check_plan` rejects any other plan before anything starts, naming
the field. Importing this module imports neither torch nor a backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from galvatron.errors import GalvatronError, PlanError
from galvatron.plan import DType, LayerStrategy, Plan, Recompute

BACKENDS = ("native", "deepspeed", "megatron")
"""Names accepted by ``wrap(..., backend=)`` and ``galvatron search --backend``."""


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What one backend executes."""

    name: str
    features: frozenset[str]
    """Plan features in the search's vocabulary (``pp``, ``tp``, ``sp``, ``cp:<kind>``, ``ep``,
    ``etp`` (expert TP other than ``tp``), ``zero<n>``, ``offload``, ``recompute:<mode>``, ``schedule:<name>``)."""
    dtypes: frozenset[DType]
    per_layer: frozenset[str]
    """Strategy fields that may differ between layer groups; every other field must be the same
    for all layers, the embedding and the head (empty set and ``uniform``: one strategy)."""
    uniform: bool
    """Whether the search must use one strategy and an even layer split (``SearchOptions.uniform``)."""
    gpu_only: bool
    persistent_grads: bool | None = None
    """Whether the backend holds gradients all step (``CostOptions.persistent_grads``; None: only
    when a step accumulates several micro-batches, as ``zero_grad(set_to_none=True)`` leaves them)."""
    master_weights: str = "params"
    """Where the fp32 master weights live (``CostOptions.master_weights``)."""
    selective: str = "matmuls"
    """What ``recompute: selective`` keeps (``CostOptions.selective``)."""
    elementwise: str = "autocast"
    """How its memory-bound ops run (``CostOptions.elementwise``): the native runtime runs the user's
    module eagerly under autocast (unless the user compiles it), DeepSpeed eagerly on 16-bit
    parameters; Megatron-Core fuses."""
    host_us_per_kernel: float = 33.0
    """Host time per kernel issued (``CostOptions.host_us_per_kernel``): eager PyTorch under the native
    runtime and DeepSpeed, as measured on one H100's host; 0 for Megatron-Core (fused kernels; its
    large runs are device-bound)."""
    zero1_reduce: str = "reduce_scatter"
    """How its ZeRO-1 syncs gradients (``CostOptions.zero1_reduce``)."""
    bucket_copies: bool = False
    """Whether its ZeRO-0/1 copy gradients into flat buckets and parameters out of them
    (``CostOptions.bucket_copies``)."""
    sequence_parallel_copies: bool = False
    """Whether its sequence parallelism copies around each collective
    (``CostOptions.sequence_parallel_copies``): the native runtime's token shards need no copies."""
    tensor_parallel_host_us: float = 0.0
    """Host time its TP adds per linear layer and pass (``CostOptions.tensor_parallel_host_us``): the
    native runtime's projections on local views of DTensor parameters, 400 us on one H100's host, the
    middle of the values (296-507 us) that match three host-bound TP steps of a 16-block Llama 2 7B on
    a fake process group (benchmarks/results/multi_gpu/local_tp/; 900 while the activations were
    DTensors: host_bound_tp/); 0 on CPU workers, as ``host_us_per_kernel``."""
    fsdp_host_us: tuple[float, float] = (0.0, 0.0)
    """Host time FSDP2 adds per unit and pass under ZeRO-2 and ZeRO-3 (``CostOptions.fsdp_host_us``):
    the native runtime's, 2000 and 3000 us on one H100's host, fitted to eight host-bound ZeRO-2/3
    steps of a 16-block Llama 2 7B on a fake process group (benchmarks/results/multi_gpu/host_bound_fsdp/:
    errors from -30..-57% to -13..+1%); 0 on CPU workers."""
    overlap_tp_backward: bool = True
    """Whether its TP input-gradient collectives hide behind weight-gradient GEMMs
    (``CostOptions.overlap_tp_backward``): not in the native runtime, whose reduction follows the
    module's whole backward and is needed at once by the norm before it."""
    cast_inputs_once: bool = False
    """Whether it casts each attention's and MLP's input to 16 bits once under autocast
    (``CostOptions.cast_inputs_once``): the native runtime does (``runtime.tensor.autocast_input``)."""
    cast_fused_experts: bool = False
    """Whether it hands fused experts 16-bit copies of their weights under autocast
    (``CostOptions.cast_fused_experts``): the native runtime does (``runtime.expert_wrap.apply_expert_casts``)."""
    overlap_param_gather: bool = True
    """Whether its ZeRO-1 parameter all-gather hides behind the next forward
    (``CostOptions.overlap_param_gather``)."""
    loss_bytes_per_logit: float = 12.0
    """The loss's peak bytes per logit (``CostOptions.loss_bytes_per_logit``): the user's eager
    ``F.cross_entropy(logits.float(), y)`` under the native runtime and DeepSpeed; Megatron-Core's
    fused vocab-parallel cross-entropy."""
    vocab_parallel_loss_bytes_per_logit: float | None = 16.0
    """The same under a vocabulary-parallel head (``CostOptions.vocab_parallel_loss_bytes_per_logit``):
    the native runtime's loss runs on DTensor's ``loss_parallel``; None for Megatron-Core's fused kernel."""

    def cost_options(self, accelerator: bool = True) -> dict[str, Any]:
        """``CostOptions`` keyword arguments that describe how this backend runs a plan; on CPU
        workers (not ``accelerator``) the host is the device, so no separate host side, and gloo's
        pipeline sends and receives block both ends."""
        return {"persistent_grads": self.persistent_grads, "master_weights": self.master_weights,
                "selective": self.selective, "elementwise": self.elementwise,
                "loss_bytes_per_logit": self.loss_bytes_per_logit, "zero1_reduce": self.zero1_reduce,
                "vocab_parallel_loss_bytes_per_logit": self.vocab_parallel_loss_bytes_per_logit,
                "overlap_param_gather": self.overlap_param_gather, "bucket_copies": self.bucket_copies,
                "sequence_parallel_copies": self.sequence_parallel_copies,
                "cast_inputs_once": self.cast_inputs_once, "cast_fused_experts": self.cast_fused_experts,
                "overlap_tp_backward": self.overlap_tp_backward,
                "tensor_parallel_host_us": self.tensor_parallel_host_us if accelerator else 0.0,
                "fsdp_host_us": self.fsdp_host_us if accelerator else (0.0, 0.0),
                "host_us_per_kernel": self.host_us_per_kernel if accelerator else 0.0,
                "blocking_p2p": not accelerator}

    def search_options(self) -> dict[str, Any]:
        """``SearchOptions`` keyword arguments that restrict the search to this backend."""
        return {"capabilities": self.features, "uniform": self.uniform}


_RECOMPUTE = frozenset({"recompute:selective", "recompute:full"})

CAPABILITIES: dict[str, Capabilities] = {
    "native": Capabilities(
        name="native",
        features=frozenset({"pp", "tp", "sp", "zero1", "zero2", "zero3", "offload", "schedule:1f1b",
                            "schedule:interleaved-1f1b", "schedule:zero-bubble"}) | _RECOMPUTE,
        dtypes=frozenset({DType.FP32, DType.BF16, DType.FP16}),
        per_layer=frozenset({"dp", "tp", "sp", "zero", "recompute", "offload"}), uniform=False, gpu_only=False,
        zero1_reduce="all_reduce", overlap_param_gather=False, bucket_copies=True, cast_inputs_once=True,
        cast_fused_experts=True,
        tensor_parallel_host_us=400.0, fsdp_host_us=(2000.0, 3000.0), overlap_tp_backward=False),
    "deepspeed": Capabilities(
        name="deepspeed",
        # schedule:1f1b: the search gives one-stage plans the default schedule, which runs no pipeline
        features=frozenset({"zero1", "zero2", "zero3", "offload", "schedule:1f1b"}) | _RECOMPUTE,
        dtypes=frozenset({DType.FP32, DType.BF16, DType.FP16}),
        per_layer=frozenset({"recompute"}), uniform=True, gpu_only=False, persistent_grads=True,
        master_weights="optimizer", elementwise="eager"),
    "megatron": Capabilities(
        name="megatron",
        features=frozenset({"pp", "tp", "sp", "cp:ulysses", "cp:ring", "cp:hybrid", "ep", "etp", "zero1",
                            "schedule:1f1b", "schedule:interleaved-1f1b"}) | _RECOMPUTE,
        dtypes=frozenset({DType.FP32, DType.BF16, DType.FP16}),
        per_layer=frozenset({"cp_kind", "cp_ulysses", "recompute"}), uniform=True, gpu_only=True,
        persistent_grads=True, master_weights="optimizer", selective="megatron", elementwise="fused",
        loss_bytes_per_logit=6.0, vocab_parallel_loss_bytes_per_logit=None, host_us_per_kernel=0.0),
}
"""Per backend, the plan features it executes (docs/backends.md has the same table in words)."""


def capabilities(backend: str) -> Capabilities:
    """The capability table of ``backend``; :class:`GalvatronError` for an unknown name."""
    if backend not in CAPABILITIES:
        raise GalvatronError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    return CAPABILITIES[backend]


def strategy_features(s: LayerStrategy) -> Iterator[tuple[str, str]]:
    """(field, feature) pairs a strategy uses, in the search's vocabulary."""
    if s.tp > 1:
        yield "tp", "tp"
    if s.sp:
        yield "sp", "sp"
    if s.cp > 1:
        yield "cp_kind", f"cp:{s.cp_kind.value}"
    if s.ep > 1:
        yield "ep", "ep"
    if s.etp:
        yield "etp", "etp"
    if s.zero:
        yield "zero", f"zero{s.zero}"
    if s.offload:
        yield "offload", "offload"
    if s.recompute is not Recompute.NONE:
        yield "recompute", f"recompute:{s.recompute.value}"


def plan_strategies(plan: Plan) -> list[tuple[str, LayerStrategy]]:
    """Every strategy of a plan with its field path (layer groups, then embedding and head)."""
    out = [(f"stages[{i}].layers[{g.start}:{g.end}]", g.strategy) for i, stage in enumerate(plan.stages)
           for g in stage.groups]
    return [*out, ("embedding", plan.embedding_strategy), ("head", plan.head_strategy)]


def check_plan(plan: Plan, backend: str) -> None:
    """Raise :class:`PlanError` naming the first field of ``plan`` that ``backend`` does not execute."""
    caps = capabilities(backend)
    if plan.dtype not in caps.dtypes:
        raise PlanError("dtype", f"{plan.dtype.value} is not executed by the {backend} backend")
    if plan.pp > 1:
        if "pp" not in caps.features:
            raise PlanError("stages", f"pipeline parallelism (pp {plan.pp}) is not executed by the {backend} backend")
        schedule = plan.pipeline.schedule.value
        if f"schedule:{schedule}" not in caps.features:
            raise PlanError("pipeline.schedule", f"{schedule} is not executed by the {backend} backend")
    strategies = plan_strategies(plan)
    first_path, first = strategies[0]
    for path, s in strategies:
        for name, feature in strategy_features(s):
            if feature not in caps.features:
                raise PlanError(f"{path}.{name}", f"{feature} is not executed by the {backend} backend "
                                f"(it executes: {', '.join(sorted(caps.features)) or 'plain data parallelism'})")
        for name in _FIELDS:
            if name not in caps.per_layer and getattr(s, name) != getattr(first, name):
                raise PlanError(f"{path}.{name}", f"the {backend} backend runs one {name} for the whole model; "
                                f"{getattr(s, name)!r} differs from {first_path}'s {getattr(first, name)!r}")
    if caps.uniform and len({stage.devices for stage in plan.stages}) > 1:
        raise PlanError("stages", f"the {backend} backend needs the same device count on every stage")


_FIELDS = tuple(f.name for f in dataclasses.fields(LayerStrategy))


def auto_search_options(backend: str, example_batch: Any = None) -> Any:
    """``SearchOptions`` for ``plan="auto"`` under ``backend``: its capabilities, bf16 on a GPU and
    fp32 on CPUs, the global batch of ``example_batch``. Built only when a search runs."""
    import torch

    from galvatron.runtime.relayout import first_batch_size
    from galvatron.strategies.search import SearchOptions

    batch = first_batch_size((example_batch,), {}) if example_batch is not None else None
    dtype = DType.BF16 if torch.cuda.is_available() else DType.FP32
    return SearchOptions(global_batch=batch, dtype=dtype, **capabilities(backend).search_options())


def wrap_backend(backend: str, model: Any, plan: Any, **kwargs: Any) -> Any:
    """``galvatron.wrap`` for a backend other than ``native`` (imported only then)."""
    capabilities(backend)
    if backend == "deepspeed":
        from galvatron.backends.deepspeed import wrap_deepspeed

        return wrap_deepspeed(model, plan, **kwargs)
    if backend == "megatron":
        from galvatron.backends.megatron import wrap_megatron

        return wrap_megatron(model, plan, **kwargs)
    raise GalvatronError(f"the {backend} backend is galvatron.wrap itself")
