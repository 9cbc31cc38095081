"""Per-step progress of a training run: step time, tokens/s, MFU and memory, printed by rank 0.

Every rank calls :meth:`StepMeter.step` once per optimizer step. A printed line averages the steps
since the last one: step time, and the loss over those steps and over the ranks (one scalar
all-reduce on printing steps only; the loss is never copied to the host on the others)::

    meter = StepMeter(tokens_per_step=plan.global_batch_size * seq_len,
                      flops_per_token=spec.flops_per_token(), total_steps=300)
    for step in range(300):
        loss = ...
        meter.step(step, loss)
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import torch
import torch.distributed as dist
from galvatron.launch.launcher import ENV_PEAK_FLOPS, ENV_PREDICTED_STEP

from galvatron.plan import Plan


@dataclass(frozen=True)
class StepStats:
    """What one printed progress line says."""

    step: int
    loss: float
    step_time_s: float
    tokens_per_s: float
    mfu: float | None
    """Model FLOPs utilisation against the device peak; None when the peak is unknown."""
    memory_mib: float
    """Peak device memory (GPU) or peak resident memory of the process (CPU)."""

    def format(self, total_steps: int | None, predicted_step_s: float | None) -> str:
        width = len(str(total_steps)) if total_steps else 1
        of = f"/{total_steps}" if total_steps else ""
        predicted = f" (predicted {predicted_step_s:.3f})" if predicted_step_s else ""
        mfu = f"  MFU {100 * self.mfu:.1f}%" if self.mfu is not None else ""
        return (f"step {self.step:>{width}}{of}  loss {self.loss:.4f}  {self.step_time_s:.3f} s/step{predicted}"
                f"  {self.tokens_per_s:,.0f} tok/s{mfu}  mem {self.memory_mib:,.0f} MiB")


class StepMeter:
    """Measures each step and prints on rank 0 after the first, every ``every``-th and the last step.

    ``peak_flops`` is one worker's peak FLOP/s; left out, it is what the launcher exported in
    ``GALVATRON_PEAK_FLOPS`` (on CPUs: the GEMM rate it measured, shared among the workers), and
    without either MFU is left out of the line. With ``plan``, rank 0 first prints it with the
    predicted step time the launcher exported (``GALVATRON_PREDICTED_STEP_S``).
    """

    def __init__(self, *, tokens_per_step: int, flops_per_token: float, total_steps: int | None = None,
                 every: int = 10, peak_flops: float | None = None, plan: Plan | None = None,
                 stream: TextIO | None = None) -> None:
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.total_steps, self.every = total_steps, max(every, 1)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.peak_flops = peak_flops if peak_flops is not None else _env_float(ENV_PEAK_FLOPS)
        self.predicted_step_s = _env_float(ENV_PREDICTED_STEP)
        self.stream = stream or sys.stdout
        if plan is not None and self.rank == 0:
            predicted = f"predicted step {self.predicted_step_s:.3f} s, " if self.predicted_step_s else ""
            print(f"{plan.describe()}\n({predicted}{self.tokens_per_step:,} tokens per step)", file=self.stream,
                  flush=True)
        self._last = time.perf_counter()
        self._times: list[float] = []
        self._printed = 0
        self._loss_sum: torch.Tensor | None = None

    def step(self, step: int, loss: float | torch.Tensor) -> StepStats | None:
        """Record step ``step`` (0-based) that just finished; returns the stats on printing steps."""
        now = time.perf_counter()
        self._times.append(now - self._last)
        value = loss.detach().float().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        edge = (len(self._times) == 1 and self._printed == 0) or (self.total_steps and step + 1 >= self.total_steps)
        if (step + 1) % self.every and not edge:
            self._last = time.perf_counter()
            return None
        stats = self._stats(step, _mean_over_ranks(self._loss_sum / len(self._times)))
        self._times.clear()
        self._loss_sum = None
        self._printed += 1
        if self.rank == 0:
            print(stats.format(self.total_steps, self.predicted_step_s), file=self.stream, flush=True)
        self._last = time.perf_counter()
        return stats

    def _stats(self, step: int, loss: float) -> StepStats:
        step_time = sum(self._times) / len(self._times)
        tokens_per_s = self.tokens_per_step / step_time
        mfu = None
        if self.peak_flops:
            mfu = self.flops_per_token * tokens_per_s / (self.world * self.peak_flops)
        return StepStats(step=step + 1, loss=loss, step_time_s=step_time, tokens_per_s=tokens_per_s, mfu=mfu,
                         memory_mib=peak_memory_mib())


def peak_memory_mib() -> float:
    """Peak allocated GPU memory of this process, or its peak resident set on a CPU, in MiB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else None


def _mean_over_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        if dist.get_backend() == "nccl":
            value = value.cuda()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return float(value)
