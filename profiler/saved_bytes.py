"""Bytes autograd holds for backward, measured while a step runs on real tensors.

:class:`SavedBytes` is a pair of ``torch.autograd.graph.saved_tensors_hooks``: a storage counts from
the first op that saves it until the last saved reference to it is released, the peak is kept, and
each new storage is charged to the current ``chunk`` (set by the caller, e.g. from forward hooks of a
pipeline's chunks). Storages listed in ``skip`` (parameters) are not counted. It measures what the
cost model's activation terms stand for, on CPU as on GPU, without the allocator's view of memory
(``benchmarks/pipeline_memory.py`` checks the in-flight rule of interleaved pipelines with it).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch


class SavedBytes:
    """Bytes autograd holds for backward: ``now``, ``peak`` and ``by_chunk`` (bytes first saved while
    ``chunk`` was set, per chunk). Use as ``saved_tensors_hooks(tracker.pack, tracker.unpack)``."""

    def __init__(self, skip: Iterable[int] = ()) -> None:
        self.skip = set(skip)
        """Storage pointers not counted (parameters)."""
        self.live: dict[int, list[int]] = {}
        self.now = 0
        self.peak = 0
        self.chunk: int | None = None
        self.by_chunk: dict[int, int] = {}

    @classmethod
    def without(cls, parameters: Any) -> SavedBytes:
        """A tracker that leaves ``parameters``' storages out."""
        return cls({p.untyped_storage().data_ptr() for p in parameters})

    def reset(self) -> None:
        """Start a new measurement: the peak from what is held now, no chunk bytes."""
        self.peak, self.by_chunk = self.now, {}

    def pack(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return t
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.skip or storage.nbytes() == 0:
            return t
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
            if self.chunk is not None:
                self.by_chunk[self.chunk] = self.by_chunk.get(self.chunk, 0) + entry[0]
        entry[1] += 1
        holder = t.detach()  # a reference of our own: finalised when autograd drops what pack returned
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    @staticmethod
    def unpack(t: Any) -> Any:
        return t


def pipeline_activations(runner: Any, chunks: list[Any], inputs: Any, targets: Any,
                         micro_batches: int) -> dict[str, Any]:
    """One :class:`galvatron.runtime.pipeline.PipelineRunner` step after a first one (which infers
    shapes), measured on this rank: the ``peak`` bytes autograd held for backward, what was ``left``
    after the step, and each of this rank's ``chunks``' bytes per micro-batch (``per_chunk``, in the
    chunks' order; the loss, which runs right after the last stage's forward, is that chunk's)."""
    tracker = SavedBytes.without(runner.parameters())
    handles = []
    for chunk in chunks:
        handles.append(chunk.register_forward_pre_hook(
            lambda mod, args, c=chunk.stage_index: setattr(tracker, "chunk", c)))
        if not chunk.is_last:
            handles.append(chunk.register_forward_hook(lambda mod, args, out: setattr(tracker, "chunk", None)))
    try:
        runner.step(inputs, targets)
        tracker.reset()
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
            runner.step(inputs, targets)
    finally:
        for handle in handles:
            handle.remove()
    return {"peak": tracker.peak, "left": tracker.now,
            "per_chunk": [tracker.by_chunk.get(c.stage_index, 0) / micro_batches for c in chunks]}
