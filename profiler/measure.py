"""Timing and memory measurement on one device, shared by the model profiler and the benchmarks.

Time (:class:`Clock`): on CPU, ``perf_counter``. On GPU each region is timed twice: once by the host
(how long the Python thread takes to issue it, syncs inside included) and once by CUDA events with
the GPU kept busy by a sleep kernel while the host issues the work, so launch latency does not show
up as device time. The region's time is the larger of the two: what it costs inside a model whose
host thread runs ahead of the GPU, where each layer is bound by whichever of the two is slower.

Memory (:class:`LiveBytes`): a dispatch mode that follows every storage an operator creates until it
is freed, so it sees what a block keeps for backward whatever keeps it (autograd, selective
checkpointing), minus parameters, their autocast copies (the cost model counts those with the
parameters) and the block's inputs. On GPU the caching allocator's peak gives the temporaries.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from galvatron.plan import DType

_LOW_PRECISION = {DType.BF16: torch.bfloat16, DType.FP16: torch.float16}
_MAX_HEAD_START_S = 0.1


def autocast(device: torch.device, dtype: DType) -> AbstractContextManager[Any]:
    """The autocast context for a compute dtype (fp32: none)."""
    low = _LOW_PRECISION.get(dtype)
    return torch.autocast(device.type, dtype=low) if low is not None else nullcontext()


@dataclass(frozen=True)
class Timings:
    """Per-phase seconds over repeats (see :meth:`Clock.medians`)."""

    slower: list[float]
    host: list[float]
    device: list[float]


class Clock:
    """Seconds of consecutive phases of work on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._cycles_per_s = 0.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def split(self, phases: Sequence[Callable[[Any], Any]]) -> tuple[list[float], list[float]]:
        """Run the phases in order, each given the previous one's result; host and device seconds
        of each (on CPU one clock: the host's, twice)."""
        self.sync()
        host = self._host(phases)
        if not self.cuda:
            return host, host
        return host, self._device(phases, head_start=min(2 * sum(host) + 1e-3, _MAX_HEAD_START_S))

    def median(self, phases: Sequence[Callable[[Any], Any]], repeats: int) -> list[float]:
        """Per-phase medians of ``repeats`` timings."""
        return self.medians(phases, repeats).slower

    def medians(self, phases: Sequence[Callable[[Any], Any]], repeats: int) -> Timings:
        """Per-phase medians of ``repeats`` timings: of the slower of host and device in each
        repeat and of the device alone; on GPU the host's least (CPU: all three the median). The
        host issuing a block alone, between synchronisations, is only ever slowed by noise (a
        thread waking from the last synchronisation, interrupts), which a model's host thread,
        issuing layer after layer, does not pay per layer."""
        slower, host, device = [], [], []
        for _ in range(repeats):
            h, d = self.split(phases)
            slower.append([max(a, b) for a, b in zip(h, d)])
            host.append(h)
            device.append(d)

        def med(samples: list[list[float]]) -> list[float]:
            return [statistics.median(s[i] for s in samples) for i in range(len(phases))]

        least = [min(s[i] for s in host) for i in range(len(phases))]
        return Timings(slower=med(slower), host=least if self.cuda else med(host), device=med(device))

    def _host(self, phases: Sequence[Callable[[Any], Any]]) -> list[float]:
        marks, value = [time.perf_counter()], None
        for phase in phases:
            value = phase(value)
            marks.append(time.perf_counter())
        del value
        self.sync()
        return [b - a for a, b in itertools.pairwise(marks)]

    def _device(self, phases: Sequence[Callable[[Any], Any]], head_start: float) -> list[float]:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(phases) + 1)]
        torch.cuda._sleep(int(head_start * self._rate()))
        events[0].record()
        value = None
        for phase, event in zip(phases, events[1:]):
            value = phase(value)
            event.record()
        del value
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(events)]

    def _rate(self) -> float:
        """Clock cycles per second of ``torch.cuda._sleep``, measured once."""
        if not self._cycles_per_s:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            cycles = 10_000_000
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            torch.cuda.synchronize()
            self._cycles_per_s = cycles / max(start.elapsed_time(end) / 1e3, 1e-6)
        return self._cycles_per_s


class LiveBytes(TorchDispatchMode):
    """Bytes of storages created under this mode and still alive; ``peak`` is the most seen at once.

    Storages in ``ignore`` (data pointers: parameters, inputs) and autocast copies of parameters are
    not counted. Enter it once per phase; what is alive carries over between phases.
    """

    def __init__(self, ignore: Iterable[int] = ()) -> None:
        super().__init__()
        self.ignore = set(ignore)
        self.peak = 0
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self._purge()
        is_cast = func is torch.ops.aten._to_copy.default and isinstance(args[0], nn.Parameter)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                try:
                    storage = t.untyped_storage()
                except (RuntimeError, NotImplementedError):  # tensor subclasses without one storage
                    continue
                ptr = storage.data_ptr()
                if is_cast:
                    self.ignore.add(ptr)
                elif ptr not in self.ignore and ptr not in self._live:
                    self._live[ptr] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out

    @property
    def live(self) -> int:
        """Bytes alive now."""
        self._purge()
        return sum(n for _, n in self._live.values())

    def reset_peak(self) -> None:
        self.peak = self.live

    def _purge(self) -> None:
        dead = [ptr for ptr, (ref, _) in self._live.items() if ref.expired()]
        for ptr in dead:
            del self._live[ptr]


def storage_ptrs(tensors: Iterable[Any]) -> set[int]:
    """Data pointers of the storages of the tensors among ``tensors`` (nested containers allowed)."""
    return {t.untyped_storage().data_ptr() for t in tree_flatten(list(tensors))[0] if isinstance(t, torch.Tensor)}


def measure_memory(device: torch.device, forward: Callable[[], Any], backward: Callable[[Any], None],
                   ignore: set[int]) -> tuple[float, float | None]:
    """Bytes kept from ``forward()`` until ``backward(out)`` and the peak temporaries above them
    (GPU allocator; on CPU the storages alive), as ``(activation_bytes, temporary_bytes)``."""
    live = LiveBytes(ignore)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with live:
        out = forward()
    kept = live.live
    if cuda:
        end_fwd = torch.cuda.memory_allocated(device)
        fwd_temp = torch.cuda.max_memory_allocated(device) - end_fwd
        torch.cuda.reset_peak_memory_stats(device)
        backward(out)
        del out
        torch.cuda.synchronize(device)
        return float(kept), float(max(fwd_temp, torch.cuda.max_memory_allocated(device) - end_fwd, 0))
    fwd_temp = live.peak - kept
    live.reset_peak()
    with live:
        backward(out)
        del out
    return float(kept), float(max(fwd_temp, live.peak - kept))
