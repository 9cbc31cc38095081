"""What the torchrun and Ray launchers share: where a run's plan comes from (a file or the search,
on a described cluster or on this machine's CPUs) and how the workers learn it.

The launcher hands the plan to every worker as a file named by the ``GALVATRON_PLAN`` environment
variable, which ``galvatron.wrap(model)`` reads (``plan="auto"``, its default). The other
``GALVATRON_*`` variables below tell a training script the predicted step time and device peak
(for progress lines), where to checkpoint, how often, and which restart it is.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from galvatron.errors import GalvatronError
from galvatron.plan import DType, Plan
from galvatron.spec import ModelSpec

ENV_PLAN = "GALVATRON_PLAN"
"""Path of the plan YAML every worker runs (what ``wrap(model)`` reads)."""
ENV_PREDICTED_STEP = "GALVATRON_PREDICTED_STEP_S"
"""The cost model's step time for that plan, in seconds (printed next to the measured one)."""
ENV_PEAK_FLOPS = "GALVATRON_PEAK_FLOPS"
"""One worker's peak FLOP/s, for MFU (on CPUs: the GEMM rate the launcher measured, shared out)."""
ENV_CHECKPOINT_DIR = "GALVATRON_CHECKPOINT_DIR"
"""Folder for torch.distributed.checkpoint checkpoints; a restarted worker resumes from the latest."""
ENV_CHECKPOINT_INTERVAL = "GALVATRON_CHECKPOINT_INTERVAL"
"""Steps between checkpoints."""
ENV_RESTART = "GALVATRON_RESTART"
"""How many times the workers have been restarted after a failure (0 on the first start)."""
ENV_ALLOC_CONF = "PYTORCH_ALLOC_CONF"
"""PyTorch's allocator settings (torch >= 2.9; ``PYTORCH_CUDA_ALLOC_CONF`` is its older name)."""
WORKER_ALLOC_CONF = "expandable_segments:True"
"""The CUDA caching allocator's mode for the workers unless the user chose one: with expandable
segments the least memory a step runs in stays within 0.3-4.7% of its allocated peak (what the cost
model predicts and the search fits), against 3.6-23.3% more with the default allocator
(benchmarks/results/reserved_memory/replay.md: Llama 3.2 1B and torchtitan's Llama 3.1 8B FSDP step)."""


class LaunchError(GalvatronError, RuntimeError):
    """Workers could not be started, or failed more often than the run allows."""


@dataclass(frozen=True, kw_only=True)
class PlanChoice:
    """The plan a run uses and where it came from."""

    plan: Plan
    source: str
    """``file``, ``search`` or ``given`` (handed to :func:`galvatron.launch.adapt.replan`)."""
    predicted_step_s: float | None = None
    """Step time the cost model predicts, when the plan was costed."""

    def describe(self) -> str:
        predicted = f", predicted step {self.predicted_step_s:.3f} s" if self.predicted_step_s else ""
        return f"plan ({self.source}{predicted}):\n{self.plan.describe()}"


def plan_from_file(path: str | Path, world_size: int, spec: ModelSpec | None = None) -> PlanChoice:
    """Load a plan YAML and check it against the world size (and the model, when given)."""
    return PlanChoice(plan=Plan.load(path).validate(world_size, spec), source="file")


def search_plan(spec: ModelSpec, world_size: int, *, cluster: object, global_batch: int | None = None,
                dtype: DType = DType.FP32, fixed: Mapping[str, Any] | None = None,
                exclude: Sequence[str] = ()) -> PlanChoice:
    """The search's fastest plan for ``spec`` on ``world_size`` devices of ``cluster`` (a
    ``galvatron.strategies.hardware.Cluster`` or a measured ``Perf``), with ``fixed`` values pinned
    and the ``exclude`` capabilities left out (see ``SearchOptions.fixed`` and ``capabilities``).
    """
    from galvatron.strategies.cost import CostOptions
    from galvatron.strategies.search import ALL_CAPABILITIES, SearchOptions, search

    from galvatron.backends import capabilities

    runnable = frozenset(c for c in ALL_CAPABILITIES if not c.startswith(RUNTIME_LACKS))
    options = SearchOptions(global_batch=global_batch, dtype=dtype, fixed=dict(fixed or {}),
                            capabilities=runnable - frozenset(exclude))
    # how the native runtime runs a plan (CPU workers: the nominal "cpu" GPU of local_cpu_cluster)
    native = CostOptions(**capabilities("native").cost_options(accelerator=cluster.gpu.name != "cpu"))
    result = search(spec, cluster, options, native, world_size=world_size)
    return PlanChoice(plan=result.best.plan, source="search", predicted_step_s=result.best.step_time_s)


RUNTIME_LACKS = ("cp:", "ep", "etp")
"""Search capabilities (prefixes) the runtime cannot run yet: context and expert parallelism (and
expert TP other than tp, which the native runtime refuses)."""

CPU_FIXED = {"offload": False}
"""Pinned search values on CPU workers: offloading to host memory means nothing there."""


def local_cpu_cluster(workers: int, *, tflops: float | None = None, gloo_gbps: float = 2.0,
                      gloo_latency_us: float = 50.0) -> object:
    """A ``galvatron.strategies.hardware.Cluster`` describing ``workers`` CPU processes on this machine,
    for the cost model: ``tflops`` per worker (default: the fp32 GEMM rate measured here, shared
    among the workers), RAM split evenly, loopback gloo at an assumed ``gloo_gbps`` GB/s and
    ``gloo_latency_us`` per step."""
    from galvatron.strategies.hardware import GPU, Cluster, Link

    tflops = tflops if tflops is not None else cpu_peak_flops(workers) / 1e12
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = GPU(name="cpu", peak_tflops={"fp32": tflops, "bf16": tflops, "fp16": tflops}, memory_gib=ram_gib / workers,
              hbm_gbps=10.0, matmul_efficiency=1.0, matmul_efficiency_fp8=1.0,
              attention_kernels={"sdpa": {"forward": 0.5, "backward": 0.5}}, memory_efficiency=1.0,
              kernel_overhead_us=20.0, intra_node="loopback", reserved_gib=0.5)
    loopback = Link(name="loopback-gloo", gbps=gloo_gbps, efficiency=1.0, latency_us=gloo_latency_us)
    return Cluster(name=f"{workers}xCPU", gpu=cpu, gpus_per_node=workers, nodes=1, intra=loopback, inter=loopback,
                   nics_per_node=1)


def cpu_peak_flops(workers: int) -> float:
    """One of ``workers`` CPU workers' share of this machine's fp32 GEMM rate, in FLOP/s: one
    thread's measured rate, times the cores per worker when there are fewer cores than workers."""
    cores = len(os.sched_getaffinity(0))
    return measure_matmul_tflops() * 1e12 * min(1.0, cores / workers)


def measure_matmul_tflops(size: int = 256, repeats: int = 5, seconds: float = 0.05) -> float:
    """Best achieved fp32 GEMM rate of one thread here over ``repeats`` short runs, in TFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = 0.0
    try:
        with torch.no_grad():
            torch.mm(a, b)
            for _ in range(repeats):
                count, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    torch.mm(a, b)
                    count += 1
                best = max(best, 2 * size**3 * count / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return best / 1e12


def plan_from_env() -> Plan | None:
    """The plan the launcher exported in ``GALVATRON_PLAN``, or None when there is none."""
    path = os.environ.get(ENV_PLAN)
    return Plan.load(path) if path else None


def worker_env(choice: PlanChoice | None, *, peak_flops: float | None = None, checkpoint_dir: str | Path | None = None,
               checkpoint_interval: int | None = None) -> dict[str, str]:
    """The ``GALVATRON_*`` variables a launcher exports to its workers, but for ``GALVATRON_PLAN``: the
    plan's file is written where the workers run (``choice`` None: they search their own); and the
    allocator's mode (:data:`WORKER_ALLOC_CONF`) unless this environment sets one."""
    env = {}
    if not any(name in os.environ for name in (ENV_ALLOC_CONF, "PYTORCH_CUDA_ALLOC_CONF")):
        env[ENV_ALLOC_CONF] = WORKER_ALLOC_CONF
    if choice is not None and choice.predicted_step_s is not None:
        env[ENV_PREDICTED_STEP] = repr(choice.predicted_step_s)
    if peak_flops is not None:
        env[ENV_PEAK_FLOPS] = repr(peak_flops)
    if checkpoint_dir is not None:
        env[ENV_CHECKPOINT_DIR] = str(Path(checkpoint_dir).resolve())
    if checkpoint_interval is not None:
        env[ENV_CHECKPOINT_INTERVAL] = str(checkpoint_interval)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def say(text: str) -> None:
    """Print launcher messages on stderr, so a script's stdout stays its own."""
    print(text, file=sys.stderr, flush=True)
