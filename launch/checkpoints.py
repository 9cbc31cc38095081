"""Periodic checkpoints of a run, and resumption from the newest, under another plan and world size.

Saving and loading are the runtime's (:mod:`galvatron.runtime.checkpoint`): DCP under the
parameters' plain names, every rank writing its own shards, loading resharded to whatever the
new plan holds on each rank (DDP replicas, FSDP2 shards, tensor-parallel DTensors, pipeline
stages, expert shards, ZeRO-1 optimizer slices, a single process). A checkpoint is one folder
``step-00000120`` under the run's checkpoint folder; DCP writes its ``.metadata`` file last, so a
folder without one (a save cut short) is never resumed from. On several nodes the checkpoint
folder must be shared storage.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from galvatron.launch.launcher import ENV_CHECKPOINT_DIR, ENV_CHECKPOINT_INTERVAL
from torch import nn

from galvatron.runtime import checkpoint

_PREFIX = "step-"


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """The folder of the checkpoint taken after ``step`` optimizer steps."""
    return Path(directory) / f"{_PREFIX}{step:08d}"


def completed(directory: str | Path) -> list[tuple[int, Path]]:
    """Finished checkpoints under ``directory`` as (step, folder), oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(p.name[len(_PREFIX):]), p) for p in root.glob(f"{_PREFIX}*") if (p / ".metadata").is_file()]
    return sorted(found)


def latest(directory: str | Path) -> tuple[int, Path] | None:
    """The newest finished checkpoint under ``directory`` as (step, folder), or None."""
    done = completed(directory)
    return done[-1] if done else None


def save(directory: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Save a wrapped ``model`` (and ``optimizer``) after ``step`` steps; every rank calls it."""
    path = checkpoint_path(directory, step)
    checkpoint.save(model, path, optimizer)
    return path


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load a checkpoint into a wrapped ``model`` (and ``optimizer``), resharding it to their plan;
    returns the steps it had done. Every rank calls it."""
    path = Path(path)
    checkpoint.load(model, path, optimizer)
    return int(path.name[len(_PREFIX):])


class Checkpointer:
    """Periodic checkpoints of one run and resumption from the newest.

    ``interval`` steps between saves (0: never); ``keep`` newest checkpoints kept (None: all).
    """

    def __init__(self, directory: str | Path, interval: int, keep: int | None = 2) -> None:
        self.directory, self.interval, self.keep = Path(directory), interval, keep

    @classmethod
    def from_env(cls, interval: int = 0, keep: int | None = 2) -> Checkpointer | None:
        """The checkpointer the launcher asked for (``GALVATRON_CHECKPOINT_DIR``, and
        ``GALVATRON_CHECKPOINT_INTERVAL`` over ``interval``), or None when it named no folder."""
        directory = os.environ.get(ENV_CHECKPOINT_DIR)
        if not directory:
            return None
        return cls(directory, int(os.environ.get(ENV_CHECKPOINT_INTERVAL, interval)), keep)

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Load the newest checkpoint, if any; returns the number of steps it had done (0 if none)."""
        found = latest(self.directory)
        if found is None:
            return 0
        return load(found[1], model, optimizer)

    def maybe_save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                   *, force: bool = False) -> Path | None:
        """Save when ``step`` (steps done) is a multiple of the interval, or when ``force``."""
        if not force and (self.interval <= 0 or step % self.interval):
            return None
        path = save(self.directory, step, model, optimizer)
        self._prune()
        return path

    def _prune(self) -> None:
        if self.keep is None or (dist.is_initialized() and dist.get_rank() != 0):
            return
        for _, old in completed(self.directory)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
