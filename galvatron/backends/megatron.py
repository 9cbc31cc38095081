"""The Megatron-Core backend: models built from ``megatron.core`` (``GPTModel``, MoE) run a
uniform plan through Megatron's own parallel state, DDP, distributed optimizer and pipeline
schedules (Shoeybi et al. 2019 TP; Narayanan et al. SC'21 PP with virtual stages; Korthikanti
et al. 2022 SP; Megatron-Core CP and EP). GPU only: Megatron-Core hard-codes CUDA.

A Megatron model's layer shapes depend on the parallel state, so the backend builds it:
``wrap(MegatronModel(config=TransformerConfig(...), build=...), plan, backend="megatron")``
sets up the parallel state from the plan, fills the config's parallelism fields
(:func:`megatron_settings`), calls ``build(config, pre_process, post_process, vp_stage)`` once
per virtual stage, and returns a :class:`MegatronRunner` (``plan``, ``optimizer``,
``train_step``, ``shard_batch``, ``dp_size``, ``dp_rank``, ``chunks``).

Plan -> Megatron: ``tp`` / ``sp`` / ``pp`` / ``virtual_stages`` / ``cp`` / ``ep`` / ``etp`` (when set:
``expert_tensor_parallel_size``, MoE Parallel Folding) to the parallel sizes; ``cp_kind`` per
layer to ``cp_comm_type`` (ulysses ``a2a``, ring ``p2p``, hybrid ``a2a+p2p`` with
``hierarchical_context_parallel_sizes = [cp_ulysses, cp / cp_ulysses]``);
a first or last stage one block short of the others to ``account_for_embedding_in_pipeline_split``
or ``account_for_loss_in_pipeline_split``; ``zero: 1`` to the distributed optimizer; ``recompute`` to
``recompute_granularity`` (all
``selective``; or ``full`` on the first ``k`` layers of every stage: method ``block``, all
layers: method ``uniform``); ``dtype`` to ``bf16`` / ``fp16`` with fp32 main parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from galvatron.backends import check_plan
from galvatron.errors import GalvatronError, PlanError
from galvatron.plan import CPKind, DType, Plan, Recompute

_CP_COMM = {CPKind.ULYSSES: "a2a", CPKind.RING: "p2p", CPKind.HYBRID: "a2a+p2p"}
_WHEELS = "pip install 'galvatron[megatron]' (megatron-core>=0.16.1,<0.17 and packaging>=24.2)"


@dataclass(frozen=True, kw_only=True)
class MegatronSettings:
    """A plan in Megatron-Core's terms (plain data and torch dtypes, built without importing Megatron)."""

    parallel: dict[str, Any]
    """Keyword arguments of ``parallel_state.initialize_model_parallel``."""
    config: dict[str, Any]
    """``TransformerConfig`` fields the plan decides (parallel sizes, CP, recompute, dtype)."""
    ddp: dict[str, Any]
    """``DistributedDataParallelConfig`` fields."""
    optimizer: dict[str, Any]
    """``OptimizerConfig`` fields besides the optimizer's own hyper-parameters."""
    dp: int
    micro_batch_size: int
    """Samples per micro-batch per data-parallel replica."""
    num_micro_batches: int


def _pipeline_split(plan: Plan) -> dict[str, bool]:
    """The layer split as Megatron-Core expresses it: every (virtual) stage the same block count ``k``,
    except that the first and the last may hold ``k - 1``, the embedding and the loss then counting as
    a block each (``account_for_embedding_in_pipeline_split``, ``account_for_loss_in_pipeline_split``;
    with ``k = 1`` the first stage holds the embedding alone). Any other split is a :class:`PlanError`."""
    counts = [stage.end - stage.start for stage in plan.stages]
    k = max(counts)
    if all(c == k for c in counts):
        return {}
    if len(counts) > 1 and all(c == k for c in counts[1:-1]) and {counts[0], counts[-1]} <= {k, k - 1}:
        return {"account_for_embedding_in_pipeline_split": counts[0] == k - 1,
                "account_for_loss_in_pipeline_split": counts[-1] == k - 1}
    raise PlanError("stages", f"Megatron-Core splits layers evenly over (virtual) stages, the embedding and the loss "
                              f"optionally counted as a layer each; got {counts}")


def megatron_settings(plan: Plan, world_size: int) -> MegatronSettings:
    """Map ``plan`` (one the megatron backend accepts, checked here) on ``world_size`` GPUs to
    Megatron-Core settings; :class:`PlanError` naming the field for what Megatron cannot express."""
    plan.validate(world_size)
    check_plan(plan, "megatron")
    s = plan.embedding_strategy
    vpp = plan.pipeline.virtual_stages
    edges = _pipeline_split(plan)
    replicas = s.dp * plan.num_micro_batches
    if plan.global_batch_size % replicas:
        raise PlanError("global_batch_size", f"{plan.global_batch_size} does not split into dp {s.dp} x "
                        f"{plan.num_micro_batches} micro-batches")
    low = {DType.BF16: "bf16", DType.FP16: "fp16"}.get(plan.dtype)
    parallel = {"tensor_model_parallel_size": s.tp, "pipeline_model_parallel_size": plan.pp,
                "virtual_pipeline_model_parallel_size": vpp if vpp > 1 else None,
                "context_parallel_size": s.cp, "expert_model_parallel_size": s.ep}
    if s.etp:
        parallel["expert_tensor_parallel_size"] = s.etp
    config: dict[str, Any] = {**parallel, "sequence_parallel": s.sp, **_context(plan), **_recompute(plan), **edges}
    if s.cp > 1 and config.get("hierarchical_context_parallel_sizes"):
        parallel["hierarchical_context_parallel_sizes"] = config["hierarchical_context_parallel_sizes"]
    if low:
        import torch

        dtype = torch.bfloat16 if low == "bf16" else torch.float16
        config |= {low: True, "params_dtype": dtype, "pipeline_dtype": dtype}
    distributed = s.zero == 1
    return MegatronSettings(
        parallel=parallel, config=config,
        ddp={"use_distributed_optimizer": distributed, "grad_reduce_in_fp32": True, "overlap_grad_reduce": False},
        optimizer={"use_distributed_optimizer": distributed, "bf16": low == "bf16", "fp16": low == "fp16",
                   "clip_grad": 0.0},
        dp=s.dp, micro_batch_size=plan.global_batch_size // replicas, num_micro_batches=plan.num_micro_batches,
    )


def _layer_strategies(plan: Plan) -> list[tuple[str, Any]]:
    return [(f"stages[{i}].layers[{layer}]", g.strategy) for i, stage in enumerate(plan.stages)
            for g in stage.groups for layer in range(g.start, g.end)]


def _context(plan: Plan) -> dict[str, Any]:
    """``cp_comm_type`` (one value, or one per layer) and the hybrid's hierarchical sizes."""
    layers = _layer_strategies(plan)
    if plan.embedding_strategy.cp == 1:
        return {}
    kinds = [_CP_COMM[s.cp_kind] for _, s in layers]
    ulysses = {s.cp_ulysses for _, s in layers if s.cp_kind is CPKind.HYBRID}
    if len(ulysses) > 1:
        raise PlanError(f"{layers[0][0]}.cp_ulysses", f"Megatron-Core has one hybrid Ulysses degree, not {ulysses}")
    out: dict[str, Any] = {"cp_comm_type": kinds[0] if len(set(kinds)) == 1 else kinds}
    if ulysses:
        u = ulysses.pop()
        out["hierarchical_context_parallel_sizes"] = [u, plan.embedding_strategy.cp // u]
    return out


def _recompute(plan: Plan) -> dict[str, Any]:
    """Megatron recomputes either selectively everywhere or fully the first ``k`` layers of every
    (virtual) stage (``block``), or every layer (``uniform``)."""
    modes = {s.recompute for _, s in _layer_strategies(plan)}
    if modes == {Recompute.NONE}:
        return {}
    if modes == {Recompute.SELECTIVE}:
        return {"recompute_granularity": "selective"}
    if modes == {Recompute.FULL}:
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if Recompute.SELECTIVE in modes:
        raise PlanError("stages", "Megatron-Core recomputes selectively or fully, not both in one model")
    firsts = set()
    for i, stage in enumerate(plan.stages):
        flags = [g.strategy.recompute is Recompute.FULL for g in stage.groups for _ in range(g.start, g.end)]
        k = flags.index(False) if False in flags else len(flags)
        if any(flags[k:]):
            raise PlanError(f"stages[{i}]", "Megatron-Core fully recomputes the first layers of a stage only")
        firsts.add(k)
    if len(firsts) > 1:
        raise PlanError("stages", f"Megatron-Core recomputes the same number of layers per stage, not {sorted(firsts)}")
    return {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": firsts.pop()}


# ====================================================================== the runtime (GPU)
@dataclass(frozen=True, kw_only=True)
class MegatronModel:
    """A Megatron-Core model for the backend to build under a plan."""

    config: Any
    """The model's ``TransformerConfig`` (shape, dtype-free fields); the plan fills parallelism."""
    build: Callable[[Any, bool, bool, int | None], Any]
    """``build(config, pre_process, post_process, vp_stage)`` -> one model chunk, e.g. a ``GPTModel``."""
    seed: int = 1234
    """Seed of Megatron's model-parallel RNG tracker (weight initialisation, dropout)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """More ``TransformerConfig`` fields set after the plan's (e.g. fusions off)."""


def require_cuda() -> None:
    """:class:`GalvatronError` unless a CUDA GPU is visible (Megatron-Core needs one)."""
    import torch

    if not torch.cuda.is_available():
        raise GalvatronError("the megatron backend runs on CUDA GPUs only (Megatron-Core hard-codes CUDA); on CPUs "
                             "use backend='native' or backend='deepspeed'")


def import_megatron() -> Any:
    """``megatron.core``, or :class:`GalvatronError` saying what to install."""
    try:
        import megatron.core
    except ImportError as err:
        raise GalvatronError(f"the megatron backend needs Megatron-Core: {_WHEELS} ({err})") from err
    return megatron.core


def wrap_megatron(model: MegatronModel, plan: Plan | str | Path | None, *, example_batch: Any = None,
                  tp_plan: Mapping[str, str] | None = None, search_options: Any = None,
                  timeout: timedelta | None = None) -> MegatronRunner:
    """``galvatron.wrap(MegatronModel(...), plan, backend="megatron")``: see the module docstring."""
    require_cuda()
    if not isinstance(model, MegatronModel):
        raise GalvatronError("the megatron backend builds Megatron-Core models itself: pass "
                             "galvatron.backends.megatron.MegatronModel(config=..., build=...)")
    if tp_plan is not None or example_batch is not None or search_options is not None:
        raise GalvatronError("the megatron backend takes no tp_plan, example_batch or search_options (Megatron "
                             "models carry their own parallel layers; search with "
                             "`galvatron search --backend megatron`)")
    if not isinstance(plan, Plan):
        if plan is None or str(plan) == "auto":
            raise GalvatronError("the megatron backend needs a Plan or a plan YAML; get one with "
                                 "`galvatron search --backend megatron`")
        plan = Plan.load(plan)
    import torch.distributed as dist

    from galvatron.runtime.apply import DEFAULT_TIMEOUT, init_distributed

    init_distributed(timeout or DEFAULT_TIMEOUT)
    settings = megatron_settings(plan, dist.get_world_size())
    return MegatronRunner(model, plan, settings)


class MegatronRunner:
    """A plan running on Megatron-Core: the model chunks of this rank, wrapped in Megatron's DDP.

    Differences from the native ``GalvatronModule``: it is not the user's module (the chunks are
    in :attr:`chunks`); ``optimizer`` accepts ``torch.optim.AdamW`` and ``torch.optim.SGD`` and
    builds Megatron's optimizer with the same hyper-parameters (no gradient clipping; Megatron
    exempts biases and norms from weight decay); ``train_step(batch)`` takes ``(tokens, labels)``
    and computes the mean token cross-entropy inside Megatron (vocabulary-parallel), so it takes
    no ``loss_fn``."""

    def __init__(self, model: MegatronModel, plan: Plan, settings: MegatronSettings) -> None:
        core = import_megatron()
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.module import Float16Module

        self.plan, self.settings = plan, settings
        self.version = getattr(core, "__version__", "unknown")
        parallel_state.initialize_model_parallel(**settings.parallel)
        tensor_parallel.model_parallel_cuda_manual_seed(model.seed)
        self.config = dataclasses.replace(model.config, **{**settings.config, **model.extra})
        vpp = plan.pipeline.virtual_stages
        chunks = []
        for v in range(vpp):
            stage = v if vpp > 1 else None
            first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
            last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
            chunk = model.build(self.config, first, last, stage).cuda()
            if plan.dtype in (DType.BF16, DType.FP16):
                chunk = Float16Module(self.config, chunk)
            ddp = DistributedDataParallelConfig(**settings.ddp)
            chunks.append(DistributedDataParallel(self.config, ddp, chunk, disable_bucketing=v > 0))
        self.chunks = chunks
        self._optimizer: Any = None

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: a step's batch is split into this many shards."""
        return self.settings.dp

    @property
    def dp_rank(self) -> int:
        """Which data shard this rank consumes."""
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()

    def shard_batch(self, batch: Any) -> Any:
        """This rank's data shard of a global ``(tokens, labels)`` batch (split along dim 0)."""
        return tuple(t.chunk(self.dp_size)[self.dp_rank] for t in batch)

    def optimizer(self, optimizer_cls: Any = None, **kwargs: Any) -> Any:
        """Megatron's optimizer over the chunks (distributed under ZeRO-1) with the hyper-parameters
        of ``optimizer_cls(**kwargs)``: ``torch.optim.AdamW`` (default) or ``torch.optim.SGD``."""
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        if self._optimizer is not None:
            raise GalvatronError("the Megatron optimizer exists already: call optimizer(...) once")
        from megatron.core.distributed import finalize_model_grads

        config = OptimizerConfig(**self.settings.optimizer, **optimizer_settings(optimizer_cls, kwargs))
        self._optimizer = get_megatron_optimizer(config, self.chunks)
        # what Megatron-LM's training loop sets: the schedules call these after backward
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self._optimizer.scale_loss
        self.config.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        return self._optimizer

    def train_step(self, batch: tuple[Any, Any], loss_fn: Any = None) -> Any:
        """Forward and backward of one step on this rank's shard ``(tokens, labels)`` (B, S) through
        the plan's schedule; returns the mean token cross-entropy over all data (every rank).
        Call ``optimizer.step()`` after it (it also zeroes the gradients it consumed)."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if loss_fn is not None:
            raise GalvatronError("the megatron backend computes Megatron's vocabulary-parallel cross-entropy; "
                                 "train_step takes no loss_fn")
        if self._optimizer is None:
            raise GalvatronError("call optimizer(...) before train_step")
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self._optimizer.zero_grad()
        tokens, labels = (t.cuda(non_blocking=True) for t in batch)
        n, seq = self.settings.num_micro_batches, tokens.shape[1]
        micro = list(zip(tokens.chunk(n), labels.chunk(n), strict=True))
        iterators: Any = [iter(micro) for _ in self.chunks] if len(self.chunks) > 1 else iter(micro)
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iterators,
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0], num_microbatches=n, seq_length=seq,
            micro_batch_size=tokens.shape[0] // n, forward_only=False)
        total = torch.zeros((), device="cuda")
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            total += sum(item["loss"] for item in losses) / n
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        total /= parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        return total


def optimizer_settings(optimizer_cls: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``OptimizerConfig`` fields equivalent to ``optimizer_cls(params, **kwargs)``."""
    import torch

    cls = optimizer_cls or torch.optim.AdamW
    kw = dict(kwargs)
    known = {"lr", "weight_decay", "betas", "eps", "momentum"}
    if set(kw) - known:
        raise GalvatronError(f"the megatron backend cannot pass {sorted(set(kw) - known)} to Megatron's optimizer")
    out: dict[str, Any] = {"lr": kw.get("lr", 1e-3)}
    if cls is torch.optim.AdamW:
        beta1, beta2 = kw.get("betas", (0.9, 0.999))
        return out | {"optimizer": "adam", "weight_decay": kw.get("weight_decay", 0.01), "adam_beta1": beta1,
                      "adam_beta2": beta2, "adam_eps": kw.get("eps", 1e-8)}
    if cls is torch.optim.SGD:
        return out | {"optimizer": "sgd", "weight_decay": kw.get("weight_decay", 0.0),
                      "sgd_momentum": kw.get("momentum", 0.0)}
    raise GalvatronError(f"the megatron backend maps torch.optim.AdamW and torch.optim.SGD, not {cls.__name__}")


def _forward_step(data_iterator: Iterator[Any], model: Any) -> tuple[Any, Callable[[Any], Any]]:
    """One micro-batch through a chunk: Megatron's GPT returns per-token losses given labels; the
    sequence is cut into this rank's context-parallel chunks (Megatron's load-balanced order)."""
    import torch
    from megatron.core.utils import get_batch_on_this_cp_rank

    tokens, labels = next(data_iterator)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    local = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels, "position_ids": positions})
    output = model(local["tokens"], local["position_ids"], None, labels=local["labels"])

    def loss(per_token: Any) -> tuple[Any, Any, dict[str, Any]]:
        # (sum, tokens, report): Megatron divides by the local tokens and the micro-batch count;
        # its DDP averages over dp x cp. (A 2-tuple would be scaled by cp for an all-reduced loss.)
        total = per_token.float().sum()
        tokens = torch.tensor(per_token.numel(), dtype=torch.int, device=per_token.device)
        return total, tokens, {"loss": total.detach() / per_token.numel()}

    return output, loss
