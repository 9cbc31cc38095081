"""Data parallelism and ZeRO per layer range, each range over its own data-parallel group.

- ZeRO-0 and ZeRO-1: :class:`GradientSync` averages gradients over the range's group, one
  bucket per module, as DDP does (buckets launched in a fixed order, asynchronously, during
  backward; finished when backward ends). ZeRO-1 additionally shards the optimizer states:
  see :mod:`galvatron.runtime.optim`.
- ZeRO-2 and ZeRO-3: FSDP2 ``fully_shard`` per module with ``reshard_after_forward`` False / True.

A plain ``torch.nn.parallel.DistributedDataParallel`` cannot serve here: it owns one process
group for the whole model, while each layer range of a plan reduces over a different group.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from galvatron.plan import DType

_LOW_PRECISION = {DType.BF16: torch.bfloat16, DType.FP16: torch.float16}


def local_view(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise), sharing storage."""
    with torch.no_grad():
        return t.to_local() if hasattr(t, "to_local") else t


def local_grad(p: torch.Tensor) -> torch.Tensor | None:
    """``p.grad``'s local shard, laid out like ``p``'s (DTensor ops may leave a gradient in
    another placement, e.g. a replicated gradient of a vocabulary-sharded embedding)."""
    grad = p.grad
    if grad is not None and hasattr(grad, "placements") and grad.placements != p.placements:
        with torch.no_grad():
            p.grad = grad = grad.redistribute(p.device_mesh, p.placements)
    return None if grad is None else local_view(grad)


@dataclass
class Bucket:
    """Parameters whose gradients are averaged together over one data-parallel group."""

    params: list[nn.Parameter]
    group: dist.ProcessGroup
    zero1: bool = False
    """Optimizer states sharded over ``group`` (see :mod:`galvatron.runtime.optim`)."""
    offload: bool = False
    """Sharded optimizer states kept in CPU memory."""
    divide: int | None = None
    """Divide the summed gradients by this instead of the group size (expert parameters: the
    ``dp x cp`` ranks whose tokens they saw, with the group being the expert data-parallel one)."""
    ready: int = 0
    work: Any = None
    buffer: torch.Tensor | None = field(default=None, repr=False)
    complete: bool = True
    """Every parameter had a local gradient when the bucket launched: then every one has a reduced
    gradient, and the ranks' counts need not be read back (a device sync per bucket)."""
    hooked: bool = False
    """Its parameters' gradient hooks are registered (see :meth:`GradientSync.hook_materialized`)."""

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def divisor(self) -> int:
        return self.size if self.divide is None else self.divide

    @property
    def active(self) -> bool:
        """Whether backward must touch the gradients (a reduction, or a division)."""
        return self.size > 1 or self.divisor != 1


class GradientSync:
    """DDP-equivalent gradient averaging for parameters of many data-parallel groups.

    Buckets launch in reverse registration order (the order backward produces gradients) as
    soon as each is complete; the rest launch and every one is waited for when backward ends.
    A launched bucket's gradients are views of its flat buffer, reduced and averaged in place
    (DDP's ``gradient_as_bucket_view``), so gradients are never held twice.
    A parameter without a gradient on some ranks gets the average of the others; one without
    a gradient anywhere keeps ``grad = None`` (as in single-process training).
    """

    def __init__(self) -> None:
        self.buckets: list[Bucket] = []
        self.hooks_enabled = True
        self._seen: set[int] = set()
        self._next = 0
        self._queued = False

    def add(self, params: list[nn.Parameter], group: dist.ProcessGroup, *, zero1: bool = False,
            offload: bool = False, divide: int | None = None) -> None:
        """Average the gradients of ``params`` over ``group`` after every backward (``divide``:
        sum them and divide by this instead)."""
        params = [p for p in params if p.requires_grad and id(p) not in self._seen]
        if not params:
            return
        self._seen.update(id(p) for p in params)
        bucket = Bucket(params, group, zero1=zero1, offload=offload, divide=divide)
        self.buckets.append(bucket)
        if not any(p.is_meta for p in params):
            self._hook(bucket)

    def hook_materialized(self) -> None:
        """Register the gradient hooks of buckets added while their parameters were on the meta
        device: materialising a parameter swaps its tensor (``torch.utils.swap_tensors``), which
        keeps the Python object but not the hooks registered on it."""
        for bucket in self.buckets:
            self._hook(bucket)

    def _hook(self, bucket: Bucket) -> None:
        if bucket.hooked or not bucket.active:
            return
        bucket.hooked = True
        # The hooks live in the parameters' C++ side, out of the garbage collector's sight: through
        # strong references, parameter -> hook -> bucket -> parameter would keep every parameter
        # (and all this references) alive after the model is deleted.
        refs = weakref.ref(self), weakref.ref(bucket)
        for p in bucket.params:
            p.register_post_accumulate_grad_hook(lambda _, refs=refs: _call_on_grad(*refs))

    def reduces(self, p: nn.Parameter) -> bool:
        """Whether ``p``'s gradient is reduced here."""
        return id(p) in self._seen

    # -------------------------------------------------------------- during backward
    def _on_grad(self, bucket: Bucket) -> None:
        if not self.hooks_enabled:
            return
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        bucket.ready += 1
        order = self._order()
        while self._next < len(order) and order[self._next].ready >= len(order[self._next].params):
            self._launch(order[self._next])
            self._next += 1

    def _finish(self) -> None:
        self.reduce()
        self._queued = False

    def _order(self) -> list[Bucket]:
        return [b for b in reversed(self.buckets) if b.active]

    # ------------------------------------------------------------------ collectives
    def reduce(self) -> None:
        """Average every bucket's gradients now (launching those not launched yet) and wait."""
        order = self._order()
        for bucket in order[self._next:]:
            self._launch(bucket)
        for bucket in order:
            self._unpack(bucket)
        self._next = 0

    def _launch(self, bucket: Bucket) -> None:
        parts, flags = [], []
        for p in bucket.params:
            grad = local_grad(p)
            if grad is None:
                parts.append(torch.zeros(local_view(p).numel(), dtype=p.dtype, device=local_view(p).device))
                flags.append(0.0)
            else:
                parts.append(grad.reshape(-1))
                flags.append(1.0)
        bucket.complete = all(flags)
        # a blocking host-to-device copy waits for the device: the common complete bucket fills on it
        dtype, device = parts[0].dtype, parts[0].device
        flag = (torch.ones(len(flags), dtype=dtype, device=device) if bucket.complete else
                torch.tensor(flags, dtype=dtype).to(device, non_blocking=True))
        bucket.buffer = torch.cat([*parts, flag])
        for p, grad, part in zip(bucket.params, _views(bucket), parts, strict=True):
            if p.grad is not None and part.dtype == grad.dtype:
                p.grad = _like_param(p, grad)  # the gradient is the buffer's: its own copy is freed now
        bucket.work = dist.all_reduce(bucket.buffer, group=bucket.group, async_op=True) if bucket.size > 1 else None

    def _unpack(self, bucket: Bucket) -> None:
        """Divide the reduced buffer in place; gradients not yet views of it (a parameter without a
        local gradient, another dtype) take their values from it. The buffer lives on in the views."""
        if bucket.work is not None:
            bucket.work.wait()
        n = len(bucket.params)
        # the ranks' counts only matter for parameters without a local gradient; reading them back
        # waits for the device, which would leave it idle while the host unpacks the next bucket
        counts = [1.0] * n if bucket.complete else bucket.buffer[-n:].tolist()
        bucket.buffer[:-n].div_(bucket.divisor)
        for p, grad, count in zip(bucket.params, _views(bucket), counts, strict=True):
            if count == 0:
                continue
            if p.grad is None:
                p.grad = _like_param(p, grad if grad.dtype == p.dtype else grad.to(p.dtype))
            elif not _same_memory(local_view(p.grad), grad):
                local_view(p.grad).copy_(grad)
        bucket.ready, bucket.work, bucket.buffer = 0, None, None


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` start at the same place of the same storage (compared without data
    pointers, which fake tensors lack)."""
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata and a.storage_offset() == b.storage_offset()


def _call_on_grad(sync: weakref.ref[GradientSync], bucket: weakref.ref[Bucket]) -> None:
    s, b = sync(), bucket()
    if s is not None and b is not None:
        s._on_grad(b)


def _views(bucket: Bucket) -> list[torch.Tensor]:
    """Each parameter's part of ``bucket.buffer``, shaped like its local values."""
    out, offset = [], 0
    for p in bucket.params:
        local = local_view(p)
        out.append(bucket.buffer[offset: offset + local.numel()].view_as(local))
        offset += local.numel()
    return out


def _like_param(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A gradient for ``p`` from its local values (a DTensor with ``p``'s layout if ``p`` is one)."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())
    return local


def apply_data_parallel(modules: list[nn.Module], *, zero: int, offload: bool, dp_mesh: Any,
                        group: dist.ProcessGroup, sync: GradientSync, dtype: DType) -> None:
    """Make ``modules`` data parallel over ``dp_mesh`` / ``group`` with ZeRO stage ``zero``.

    ZeRO 0/1 register the modules' parameters with ``sync`` (one bucket per module); ZeRO 2/3
    shard each module with FSDP2 (a list of modules that share parameters is one FSDP unit).
    Parameters ``sync`` already reduces (expert parameters) are left to it.
    """
    if zero >= 2:
        ignored = {p for m in modules for p in m.parameters() if sync.reduces(p)}
        apply_fsdp(modules, dp_mesh, reshard_after_forward=zero == 3, offload=offload, dtype=dtype, ignored=ignored)
        return
    for module in modules:
        sync.add(list(module.parameters()), group, zero1=zero == 1, offload=offload)


def apply_fsdp(modules: list[nn.Module], mesh: Any, *, reshard_after_forward: bool, offload: bool,
               dtype: DType, ignored: set[nn.Parameter] | None = None) -> None:
    """FSDP2 ``fully_shard`` each module, or all of them as one unit when they share parameters;
    ``ignored`` parameters stay as they are."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    low = _LOW_PRECISION.get(dtype)
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else
        MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy(),
    }
    if ignored:
        kwargs["ignored_params"] = ignored
    modules = [m for m in modules if any(p not in (ignored or ()) for p in m.parameters())]
    if not modules:
        return
    if _share_parameters(modules):
        fully_shard(modules, **kwargs)
    else:
        for module in modules:
            fully_shard(module, **kwargs)
    for module in modules if offload else ():
        setattr(module, _OFFLOADED, True)


_OFFLOADED = "_galvatron_offloaded"
"""Set on the modules :func:`apply_fsdp` shards with CPU offload."""


def host_parameters(model: nn.Module) -> set[int]:
    """Ids of ``model``'s parameters that live in host memory: those FSDP2 shards with CPU offload
    (the DTensors of an offloaded unit; the parameters it ignores keep their own place). A meta-device
    model materialises them there."""
    from torch.distributed.tensor import DTensor

    return {id(p) for m in model.modules() if getattr(m, _OFFLOADED, False) for p in m.parameters()
            if isinstance(p, DTensor)}


def _share_parameters(modules: list[nn.Module]) -> bool:
    seen: set[int] = set()
    for module in modules:
        ids = {id(p) for p in module.parameters()}
        if ids & seen:
            return True
        seen |= ids
    return False


def apply_fsdp_root(root: nn.Module, mesh: Any) -> None:
    """Make ``root`` the FSDP2 root over the units inside it, managing none of its own
    parameters: one lazy init, one end-of-backward callback, and ZeRO-3 units keep resharding."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    managed = {id(p) for m in root.modules() if isinstance(m, FSDPModule) for p in m.parameters()}
    if not managed:
        return
    ignored = {p for p in root.parameters() if id(p) not in managed}
    fully_shard(root, mesh=mesh, reshard_after_forward=False, ignored_params=ignored)
