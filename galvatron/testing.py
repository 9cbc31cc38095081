"""Cheap multi-rank runs on CPU for tests: forked gloo ranks from a parent that already paid the imports.

``run_ranks(fn, 4, *args)`` forks four processes, joins them into a gloo process group bound to
127.0.0.1, runs ``fn(*args)`` on each and returns the four results. A failure on any rank kills
the others at once and raises with that rank's traceback; nothing hangs past ``timeout``.
``backend="nccl"`` spawns the ranks instead (CUDA cannot be forked), one GPU each; ``fn`` and
its arguments must then be picklable (module-level). :func:`fake_group` makes this process rank 0 of a
fake process group. :class:`LiveBytes` counts the bytes of live
tensor storages on CPU, where PyTorch keeps no allocator statistics. Not imported by ``import galvatron``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

T = TypeVar("T")

# Modules whose first import costs seconds per rank: import them once, before forking.
_PREIMPORT = (
    "torch.distributed.tensor",
    "torch.distributed.tensor.parallel",
    "torch.distributed.fsdp",
    "torch.distributed.pipelining",
    "torch.distributed.checkpoint",
    "torch.distributed.algorithms._checkpoint.checkpoint_wrapper",
    "torch.nn.parallel",
    "torch.utils.checkpoint",
)


class RankFailure(RuntimeError):
    """A rank raised, died or timed out; the message holds its traceback."""


def preimport() -> None:
    """Import the distributed modules ranks will need, so forked ranks start instantly."""
    import importlib

    for name in _PREIMPORT:
        importlib.import_module(name)


def _child(fn: Callable[..., Any], rank: int, world_size: int, store_path: str, conn: Any,
           args: tuple, kwargs: dict, timeout: float, backend: str = "gloo") -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)  # forked after the parent used OpenMP: stay out of parallel regions
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        result = fn(*args, **kwargs)
        payload = pickle.dumps(("ok", result))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        payload = pickle.dumps(("error", traceback.format_exc()))
    conn.send_bytes(payload)
    conn.close()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the result is already sent
            pass
    os._exit(0)


def run_ranks(fn: Callable[..., T], world_size: int, *args: Any, timeout: float = 120.0, backend: str = "gloo",
              **kwargs: Any) -> list[T]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` forked gloo ranks (spawned NCCL ranks with
    ``backend="nccl"``); return the results by rank.

    Raises :class:`RankFailure` with the first failing rank's traceback; the other ranks are
    killed, so a bug on one rank never leaves the rest waiting in a collective.
    """
    if backend == "gloo":
        preimport()
    ctx = mp.get_context("fork" if backend == "gloo" else "spawn")
    with tempfile.TemporaryDirectory(prefix="galvatron-ranks-") as tmp:
        pipes, procs = [], []
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(fn, rank, world_size, os.path.join(tmp, "store"), child_end,
                                                    args, kwargs, timeout, backend), daemon=True)
            proc.start()
            child_end.close()
            pipes.append(parent_end)
            procs.append(proc)
        try:
            return _collect(pipes, procs, timeout)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join(5)


def _collect(pipes: list[Any], procs: list[Any], timeout: float) -> list[Any]:
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(results) < len(pipes):
        if time.monotonic() > deadline:
            missing = sorted(set(range(len(pipes))) - set(results))
            raise RankFailure(f"ranks {missing} did not finish within {timeout:.0f} s")
        for rank, conn in enumerate(pipes):
            if rank in results:
                continue
            if conn.poll(0.01):
                try:
                    status, value = pickle.loads(conn.recv_bytes())
                except EOFError:
                    raise RankFailure(f"rank {rank} died (exit code {procs[rank].exitcode})") from None
                if status == "error":
                    raise RankFailure(f"rank {rank} failed:\n{value}")
                results[rank] = value
            elif not procs[rank].is_alive() and not conn.poll(0):
                raise RankFailure(f"rank {rank} died (exit code {procs[rank].exitcode}) without a result")
    return [results[r] for r in range(len(pipes))]


@contextmanager
def fake_group(world: int) -> Iterator[None]:
    """This process as rank 0 of ``world`` on PyTorch's fake process group (collectives keep their
    shapes and move nothing), for tests that check shapes, op counts and memory, never numbers.
    Skips the test when a process group already runs here."""
    import pytest
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages made while the mode is active, and their peak: what
    ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` are on a GPU, for CPU runs.

    Each storage an operator returns is counted once, from its first sighting until it is freed
    (PyTorch keeps one Python object per storage for its whole life, so a finalizer on it sees the
    free on any thread); storages resized in place (FSDP2 frees and re-allocates its unsharded
    parameters so) count at their current size. Storages made before the mode started are not
    counted. ``with LiveBytes() as live: ...``; ``live.reset_peak()`` starts a new peak.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._resize: Any = None

    def __enter__(self) -> LiveBytes:
        self._resize = torch.UntypedStorage.resize_
        mode = self

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            out = mode._resize(storage, size)
            mode._track(storage)
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.UntypedStorage.resize_ = self._resize
        super().__exit__(*exc)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                local = getattr(t, "_local_tensor", t)  # a DTensor: its local shard
                if local.device.type != "meta":
                    self._track(local.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()
        if key not in self._sizes:
            weakref.finalize(storage, self._free, key)
            self._sizes[key] = 0
        self.live += size - self._sizes[key]
        self._sizes[key] = size
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)
