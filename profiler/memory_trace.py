"""A training step's allocations, in order, from a run on fake tensors: no GPU, no memory.

The cost model counts the bytes a step keeps; a GPU runs out of memory on the bytes PyTorch's caching
allocator *reserves*, which depend on the order and sizes of every allocation and free
(:mod:`galvatron.strategies.cost.allocator` replays such a sequence). This module records that
sequence from the step itself: the user's model, loss and optimizer run under
``torch._subclasses.FakeTensorMode`` (every op computes shapes only, through its meta kernel), and
:class:`AllocationTracer` logs each new storage an op creates and the moment it is released (its
storage is deallocated: the last tensor, view or autograd-saved reference to it is gone), which is
when the caching allocator gets the block back.

A CPU run takes CPU code paths where they differ from CUDA; :func:`cuda_kernels` routes the two that
change what a step allocates to the ops PyTorch picks on a GPU: RMSNorm to the fused kernel
(``aten._fused_rms_norm``, which keeps only the inverse RMS) and scaled-dot-product attention to
the fused kernels (cuDNN or FlashAttention: output and log-sum-exp kept, no score matrix).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from galvatron.spec_module import FusedRMSNorm

_WAIT_TENSOR = torch.ops._c10d_functional.wait_tensor.default
_ADD = torch.ops.aten.add.Tensor


def _gradient_sum(args: Any, out: Any) -> bool:
    """Whether an ``add`` may be autograd summing two gradients of one tensor: two tensors of one
    shape and dtype added with no scale while a backward pass runs."""
    if len(args) != 2 or torch._C._current_graph_task_id() == -1 or not isinstance(out, torch.Tensor):
        return False
    a, b = args
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape == out.shape
            and a.dtype == b.dtype == out.dtype)


class Allocation(NamedTuple):
    """One event of a traced step, in the form :func:`galvatron.strategies.cost.allocator.replay`
    takes (``action``, ``handle``, ``size``, ``stream``) plus the op that created the storage."""

    action: str
    """``"alloc"`` or ``"free"``."""
    handle: int
    """Pairs a free with its alloc (a storage's identity while it lives)."""
    size: int
    """Bytes of the storage."""
    stream: int
    """The stream whose pool serves it (0: the default stream)."""
    op: str
    """The op whose output it is (``""`` for adopted storages and frees)."""


class AllocationTracer(TorchDispatchMode):
    """Logs the storages ops create and their release, in program order (:class:`Allocation`).

    A storage an op only reads or returns a view of is not new; storages that exist before tracing
    (parameters, optimizer states) are counted with :meth:`adopt` or ignored. Works on real tensors
    of any device as on fake ones: the same log comes from a CUDA run, to check a fake one against."""

    def __init__(self, fake_mode: FakeTensorMode | None = None, stream: int = 0) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self.events: list[Allocation] = []
        self.stream = stream
        self._seen: set[int] = set()
        self._live: dict[int, tuple[int, int, int]] = {}  # storage key -> (handle, size, stream)
        self._next = 0
        self._patches = ExitStack()
        self._suspended = 0
        self._closed = False
        self._streams: dict[int, int] = {}
        self._accumulating: tuple[int, int, frozenset[int]] | None = None
        """The latest gradient sum: (its handle, its storage key, its inputs' storage keys); see
        :meth:`_fold_accumulation`."""

    def adopt(self, tensors: Iterable[torch.Tensor]) -> None:
        """Log ``tensors``' storages as allocated now (in order), and their release when it comes; a
        DTensor's are its local shard's."""
        for t in tensors:
            if is_traceable_wrapper_subclass(t):
                names, _ = t.__tensor_flatten__()
                self.adopt(inner for inner in (getattr(t, name) for name in names) if isinstance(inner, torch.Tensor))
            else:
                self._track(t.untyped_storage(), "")

    def __enter__(self) -> AllocationTracer:
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        self._patches = ExitStack()
        # FSDP2 frees and re-allocates its unsharded parameters by resizing their storage
        # (``free_storage``, ``alloc_storage``), which no op dispatch shows.
        self._patches.enter_context(_patch(torch.UntypedStorage, "resize_", self._traced_resize))
        # DTensor propagates shardings on fake tensors of the active fake mode: no device memory.
        self._patches.enter_context(
            _patch(ShardingPropagator, "_propagate_tensor_meta_non_cached", self._untraced))
        # Side streams (FSDP2's all-gather copy-in and reduce-scatter streams) have pools of their own
        # on a GPU; a CPU run enters them through torch.cpu.stream, a no-op, which here also sets the
        # stream its allocations are logged on.
        self._patches.enter_context(_patch(torch.cpu, "stream", self._side_stream))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._patches.close()
        super().__exit__(*exc)

    def close(self) -> list[Allocation]:
        """End the log (what is released later is not this trace's); its events."""
        self._closed = True
        return self.events

    def live_bytes(self) -> int:
        """Bytes of the logged storages not released yet."""
        live: dict[int, int] = {}
        for e in self.events:
            if e.action == "alloc":
                live[e.handle] = e.size
            else:
                live.pop(e.handle, None)
        return sum(live.values())

    def _traced_resize(self, resize: Any) -> Any:
        def traced(storage: torch.UntypedStorage, size: int) -> Any:
            key, before = storage._cdata, storage.nbytes()
            out = resize(storage, size)
            self._resized(key, before, int(size))
            return out

        return traced

    def _untraced(self, propagate: Any) -> Any:
        def untraced(*args: Any, **kwargs: Any) -> Any:
            self._suspended += 1
            try:
                return propagate(*args, **kwargs)
            finally:
                self._suspended -= 1

        return untraced

    def _side_stream(self, cpu_stream: Any) -> Any:
        @contextmanager
        def stream(s: Any) -> Iterator[None]:
            outer = self.stream
            self.stream = self._streams.setdefault(id(s), len(self._streams) + 1)
            try:
                with cpu_stream(s):
                    yield
            finally:
                self.stream = outer

        return stream

    def _resized(self, key: int, before: int, after: int) -> None:
        if key not in self._live or before == after:
            return
        handle, _, stream = self._live[key]
        if before:
            self.events.append(Allocation("free", handle, before, stream, ""))
        if after:
            handle, stream = self._next, self.stream
            self._next += 1
            self.events.append(Allocation("alloc", handle, after, stream, "resize_"))
        self._live[key] = (handle, after, stream)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        leaves = tree_leaves((args, kwargs))
        if any(is_traceable_wrapper_subclass(t) for t in leaves):
            return NotImplemented  # a DTensor: its own dispatch runs the ops on its local shards, seen here
        for t in leaves:
            if isinstance(t, torch.Tensor):
                self._known(t.untyped_storage())
        if func is _WAIT_TENSOR and self.fake_mode is not None:
            return args[0]  # on a device it returns its input; a fake run's version makes a new tensor
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and self._counts(t):
                self._track(t.untyped_storage(), str(func))
        if func is _ADD and _gradient_sum(args, out):
            key = out.untyped_storage()._cdata
            if key in self._live:
                self._accumulating = (self._live[key][0], key, frozenset(a.untyped_storage()._cdata for a in args))
        return out

    def _counts(self, t: torch.Tensor) -> bool:
        """Whether ``t`` takes device memory: in a fake run, a fake tensor of its mode (DTensor
        propagates shardings on fake tensors of its own; real CPU tensors are host memory); in a
        real one, any but a meta tensor."""
        if self._suspended:
            return False
        if isinstance(t, FakeTensor):
            return t.fake_mode is self.fake_mode
        return self.fake_mode is None and t.device.type != "meta"

    def _known(self, storage: torch.UntypedStorage) -> None:
        """Mark a storage that existed before it was first seen (read by an op) as not new; forget it
        when it goes, since a later storage may take its address, which is its key."""
        key = storage._cdata
        if key not in self._seen:
            self._seen.add(key)
            weakref.finalize(storage, self._seen.discard, key)

    def _track(self, storage: torch.UntypedStorage, op: str) -> None:
        key = storage._cdata
        if key in self._seen:
            return
        self._seen.add(key)
        handle, size = self._next, storage.nbytes()
        self._next += 1
        self._live[key] = (handle, size, self.stream)
        if size:
            self.events.append(Allocation("alloc", handle, size, self.stream, op))
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self._seen.discard(key)
        handle, size, stream = self._live.pop(key)
        if self._fold_accumulation(key, (handle, size, stream)):
            return
        if size and not self._closed:
            self.events.append(Allocation("free", handle, size, stream, ""))

    def _fold_accumulation(self, key: int, allocation: tuple[int, int, int]) -> bool:
        """Autograd sums two gradients of one tensor (a residual stream, a tied weight) in place into
        one of them when nothing else holds its storage, but never while a dispatch mode such as this
        tracer is active (``InputBuffer``'s ``can_accumulate_inplace``: ``isTensorSubclassLike``), so
        a traced run, fake or real, allocates the sum. When an input of that sum is released right
        after it (nothing else held it), the sum takes the input's allocation instead of a new one,
        as in an untraced run."""
        pending, self._accumulating = self._accumulating, None
        if pending is None or key not in pending[2] or pending[1] not in self._live:
            return False
        last = self.events[-1] if self.events else None
        if last is None or last.action != "alloc" or last.handle != pending[0]:
            return False  # something happened in between: the sum was not the input's replacement
        self.events.pop()
        self._live[pending[1]] = allocation
        return True


@contextmanager
def _patch(owner: Any, name: str, wrap: Callable[[Any], Any]) -> Iterator[None]:
    """``owner.name`` replaced by ``wrap(owner.name)`` inside."""
    original = getattr(owner, name)
    setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _rms_norm(x: torch.Tensor, normalized_shape: Any, weight: torch.Tensor | None = None,
              eps: float | None = None) -> torch.Tensor:
    if not isinstance(x, FakeTensor):
        raise TypeError("cuda_kernels() serves fake tensors only (its RMSNorm computes no values)")
    if weight is not None and weight.dtype != x.dtype:  # the GPU takes the composite path too
        return _COMPOSITE["rms_norm"](x, normalized_shape, weight, eps)
    return FusedRMSNorm.apply(x, weight, len(normalized_shape))


def _attention(kind: str) -> Any:
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                  enable_gqa: bool = False) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
        if attn_mask is not None or dtype == torch.float32:  # where no fused kernel serves
            return _COMPOSITE["scaled_dot_product_attention"](
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                enable_gqa=enable_gqa)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        if kind == "cudnn":  # takes GQA's fewer K/V heads too (benchmarks/results/gqa_attention.json)
            return torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, dropout_p, is_causal, False, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                  scale=scale)[0]

    return attention


_COMPOSITE = {"rms_norm": F.rms_norm, "scaled_dot_product_attention": F.scaled_dot_product_attention}


@contextmanager
def cuda_kernels(attention: str = "cudnn") -> Iterator[None]:
    """Inside, a fake CPU run allocates as a GPU's: ``F.rms_norm`` allocates and keeps what the fused
    kernel does (``aten._fused_rms_norm``, taken on CUDA when input and weight share a dtype), and
    ``F.scaled_dot_product_attention`` without a mask runs the fused kernel ``attention`` names
    (``"cudnn"``: what torch 2.11 picks on an H100; ``"flash"``; ``"math"``: unchanged). The
    functions are replaced in ``torch.nn.functional`` (so recomputation in backward sees them too)."""
    if attention not in ("cudnn", "flash", "math"):
        raise ValueError(f"attention must be 'cudnn', 'flash' or 'math', not {attention!r}")
    with ExitStack() as patches:
        patches.enter_context(_patch(F, "rms_norm", lambda composite: _rms_norm))
        if attention != "math":
            patches.enter_context(_patch(F, "scaled_dot_product_attention", lambda composite: _attention(attention)))
        yield


def trace_steps(step: Callable[[], Any], fake_mode: FakeTensorMode | None, tensors: Iterable[torch.Tensor] = (),
                steps: int = 3, attention: str | None = "cudnn",
                tracer: AllocationTracer | None = None) -> list[Allocation]:
    """The allocations of ``steps`` calls of ``step`` (a whole training step: forward, backward,
    optimizer) after ``tensors`` (what exists before the first: parameters, batch), run inside
    ``fake_mode`` (None: on real tensors) and, unless ``attention`` is None, :func:`cuda_kernels`.
    ``tracer``: one that already logged how the model was built (its events come first).

    Python's cycle collector is off meanwhile and runs after each step, so that storages held in
    reference cycles are released at the same point of every trace (a GPU run releases them whenever
    the collector happens to run)."""
    tracer = tracer or AllocationTracer(fake_mode)
    tracer.adopt(tensors)
    kernels = cuda_kernels(attention) if attention is not None else nullcontext()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with fake_mode or nullcontext(), tracer, kernels:
            for _ in range(steps):
                step()
                gc.collect()
    except (DynamicOutputShapeException, DataDependentOutputException) as err:
        raise ValueError(f"the step has shapes that depend on values ({err.func}, e.g. MoE routing), which fake "
                         "tensors do not have; trace it on a GPU instead") from err
    finally:
        if enabled:
            gc.enable()
    return tracer.close()


class TracedMemory(NamedTuple):
    """What a traced plan's steps need on its rank 0 (:func:`trace_plan`), in bytes."""

    allocated_peak: int
    """The peak of allocated bytes (``torch.cuda.max_memory_allocated()``)."""
    reserved_peak: dict[str, int]
    """The caching allocator's reserved peak, by mode (``"default"``, ``"expandable_segments"``)."""
    least_memory: dict[str, int]
    """The least device memory the steps run in, by mode (cached segments released under pressure)."""
    events: list[Allocation]
    """The traced allocations."""
    seconds: float
    """How long tracing took."""


def lm_training_step(wrapped: torch.nn.Module, tokens: torch.Tensor, *, fused: bool = True) -> Callable[[], None]:
    """One training step of a ``galvatron.wrap``ped language model on ``tokens`` (samples, seq + 1), as
    the memory measurements train it: ``train_step`` with ``profiler.model.lm_loss`` on the shifted
    tokens, then AdamW (``fused``) and ``zero_grad(set_to_none=True)``."""
    from galvatron.profiler.model import lm_loss

    opt = wrapped.optimizer(torch.optim.AdamW, lr=1e-5, fused=fused)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step() -> None:
        wrapped.train_step((x, y), lm_loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def fewer_micro_batches(plan: Any, micro_batches: int | None) -> Any:
    """``plan`` with at most ``micro_batches`` micro-batches per step, each of the plan's size (the
    global batch shrinks); None: unchanged. What :func:`trace_plan` traces."""
    if micro_batches is None or plan.num_micro_batches <= micro_batches:
        return plan
    return dataclasses.replace(plan, global_batch_size=plan.micro_batch_size * micro_batches,
                               num_micro_batches=micro_batches)


def trace_plan(build: Callable[[], torch.nn.Module], plan: Any, *, world: int, seq_len: int, vocab: int,
               steps: int = 3, attention: str = "cudnn", build_on: str = "meta",
               micro_batches: int | None = 4) -> TracedMemory:
    """The memory rank 0 of ``world`` GPUs needs to train ``build()`` (a model taking token ids)
    under ``plan`` (a :class:`galvatron.Plan` without pipeline), traced on fake tensors on this CPU:
    the model built, wrapped on a fake process group, AdamW (fused), then ``steps`` steps of rank 0's
    share of the global batch, replayed through the caching-allocator simulator. ``build_on``:
    ``"meta"`` (the model built on the meta device, or on the host: ``galvatron.wrap`` only ever puts
    this rank's shards on the device; they are counted from the first step on, in order) or
    ``"device"`` (built at full size where it runs, as under ``torch.device("cuda")``: the whole
    model is allocated before ``wrap`` shards it, and its segments stay reserved). ``micro_batches``: at most this many
    micro-batches per step are traced (the plan's micro-batch size kept; None: all of them): each
    repeats the one before (gradients exist from the first on), so the peaks are reached by then,
    and a step of 64 micro-batches of an 8B model would take minutes to trace. Starts the process
    group; none may run in this process already."""
    import time

    import torch.distributed as dist
    from galvatron.strategies.cost.allocator import memory_needs
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import galvatron

    if build_on not in ("meta", "device"):
        raise ValueError(f"build_on={build_on!r}: expected 'meta' or 'device'")
    plan = fewer_micro_batches(plan, micro_batches)
    if plan.pp > 1:
        raise ValueError("memory tracing covers plans without pipeline parallelism (rank 0 of a pipeline "
                         "would wait on the other stages)")
    if any(g.strategy.offload for stage in plan.stages for g in stage.groups):
        raise ValueError("memory tracing covers plans without CPU offload (on fake CPU tensors the offloaded "
                         "parameters, gradients and optimizer states would count as device memory)")
    if dist.is_initialized():
        raise RuntimeError("memory tracing starts its own (fake) process group; one is running already")
    start = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        fake_mode = FakeTensorMode()
        tracer = AllocationTracer(fake_mode)
        # built at full size on fake tensors; traced only where the device would hold all of it
        with fake_mode, tracer if build_on == "device" else contextlib.nullcontext():
            model = build()
            tokens = torch.randint(0, vocab, (plan.global_batch_size // plan.stages[0].groups[0].strategy.dp,
                                              seq_len + 1))
        model.to = lambda *args, **kwargs: model  # already where it runs (and fake tensors cannot swap)
        wrapped = galvatron.wrap(model, plan=plan)
        step = lm_training_step(wrapped, tokens)
        events = trace_steps(step, fake_mode, [*wrapped.parameters(), *wrapped.buffers()], steps, attention,
                             tracer=tracer)
    finally:
        dist.destroy_process_group()
    replay = [e[:4] for e in events]
    needs = {mode: memory_needs(replay, expandable_segments=mode != "default")
             for mode in ("default", "expandable_segments")}
    return TracedMemory(needs["default"].stats.allocated_peak,
                        {mode: n.stats.reserved_peak for mode, n in needs.items()},
                        {mode: n.least_memory for mode, n in needs.items()}, events, time.perf_counter() - start)
