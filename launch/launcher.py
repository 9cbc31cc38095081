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
from functools import lru_cache
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
    best = search_runnable(spec, world_size, cluster=cluster, global_batch=global_batch, dtype=dtype, fixed=fixed,
                           exclude=exclude).best
    return PlanChoice(plan=best.plan, source="search", predicted_step_s=best.step_time_s)


def search_runnable(spec: ModelSpec, world_size: int, *, cluster: object, global_batch: int | None = None,
                    dtype: DType = DType.FP32, fixed: Mapping[str, Any] | None = None, exclude: Sequence[str] = (),
                    top_k: int = 1) -> Any:
    """The ``SearchResult`` behind :func:`search_plan`, with the ``top_k`` best plans: the space
    the native runtime runs, costed as it runs them."""
    from galvatron.strategies.search import ALL_CAPABILITIES, SearchOptions, search

    runnable = frozenset(c for c in ALL_CAPABILITIES if not c.startswith(RUNTIME_LACKS))
    options = SearchOptions(global_batch=global_batch, dtype=dtype, fixed=dict(fixed or {}),
                            capabilities=runnable - frozenset(exclude), top_k=top_k)
    return search(spec, cluster, options, native_cost_options(cluster), world_size=world_size)


def native_cost_options(cluster: object) -> Any:
    """``CostOptions`` of the native runtime on ``cluster`` (CPU workers: the "cpu" device of
    :func:`local_cpu_cluster`; the host is the device), with what a profiled ``Perf`` measured."""
    from galvatron.strategies.cost import CostOptions

    from galvatron.backends import capabilities

    native = CostOptions(**capabilities("native").cost_options(accelerator=_device_of(cluster).name != "cpu"))
    return cluster.measured_options(native) if hasattr(cluster, "measured_options") else native


def _device_of(cluster: Any) -> Any:
    """The hardware-database device of a ``Cluster``, or of the cluster a ``Perf`` measures (a
    ``ProfiledPerf`` over a ``DatasheetPerf``)."""
    while not hasattr(cluster, "gpu"):
        inner = getattr(cluster, "base", None) or getattr(cluster, "cluster", None)
        if inner is None:
            raise TypeError(f"{type(cluster).__name__} names no device (neither a Cluster nor a Perf over one)")
        cluster = inner
    return cluster.gpu


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


def local_cpu_perf(spec: ModelSpec, workers: int, *, model: str | None = None, progress: bool = True,
                   max_profile_s: float = 120.0) -> Any:
    """The cost model's view of ``workers`` CPU workers on this machine, measured rather than assumed
    (a ``galvatron.profiler.ProfiledPerf`` over :func:`local_cpu_cluster`):

    - the model: ``model`` (a preset or model YAML, built as the reference GPT with one block of
      each kind) profiled here on one thread, fp32 (``galvatron.profiler.model.cpu_worker_options``
      at ``spec``'s sequence length); its times stretched by what sharing the cores stretched compute by
      among the gloo workers below (``ClusterProfile.compute_sharing``; ``workers / cores`` without it).
      Skipped, with a message, when ``model`` is None or the profile would
      take longer than about ``max_profile_s`` (the datasheet-style GEMM rate then stands);
    - gloo: every collective among ``workers`` processes started here (over the loopback device),
      1 KiB to 1 MiB, latency and bandwidth, and the compute that communication beside it takes
      (``measured_options`` puts it in the cost options). On a shared machine those are far from
      nominal: with 4 workers on 2 cores an all-reduce takes milliseconds whatever its size, and
      hiding it behind compute saves nothing.

    Progress goes to stderr."""
    from galvatron.profiler.calibrate import profiled_perf, shared_cores_scale

    cluster = local_cpu_cluster(workers)
    model_profile = None
    if model is not None:
        estimate = _profile_estimate_s(spec, cluster)
        if estimate > max_profile_s:
            say(f"not profiling {model}: about {estimate:.0f} s on this CPU (over {max_profile_s:.0f} s); "
                "costing it from the measured GEMM rate")
        else:
            model_profile = _profile_cpu_model(model, spec.seq_len, progress)
    cluster_profile = _profile_gloo(workers, progress) if workers > 1 else None
    return profiled_perf(cluster, model_profile=model_profile, cluster_profile=cluster_profile, spec=spec,
                         compute_scale=shared_cores_scale(workers, cluster_profile))


def _profile_estimate_s(spec: ModelSpec, cluster: Any) -> float:
    """Rough seconds to profile ``spec`` on one thread here, at the measured GEMM rate."""
    from galvatron.profiler.model import cpu_worker_options, profile_flops

    alone = cluster.gpu.peak_tflops["fp32"] * 1e12 / min(1.0, len(os.sched_getaffinity(0)) / cluster.gpus_per_node)
    return profile_flops(spec, cpu_worker_options(spec.seq_len)) / alone  # the workers' share undone: it runs alone


@lru_cache(maxsize=4)
def _profile_cpu_model(model: str, seq_len: int, progress: bool) -> Any:
    """One profile per model and sequence length (a re-search after workers are lost reuses it)."""
    from galvatron.launch.cmd_profile import build_model
    from galvatron.profiler.model import cpu_worker_options, profile_on_one_thread

    say(f"profiling {model} on this CPU (one thread) ...")
    start = time.perf_counter()
    module, name, _ = build_model(model, device=torch.device("cpu"))
    profile = profile_on_one_thread(module, cpu_worker_options(seq_len), name=name, progress=progress)
    say(f"profiled {model} in {time.perf_counter() - start:.1f} s")
    return profile


def _profile_gloo(workers: int, progress: bool) -> Any:
    import tempfile

    from galvatron.profiler.cluster import GLOO_PROFILE, spawn_local

    say(f"profiling gloo among {workers} local processes ...")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="galvatron-gloo-") as tmp:
        profile = spawn_local(workers, GLOO_PROFILE, os.path.join(tmp, "cluster.yaml"), progress=progress, cpu=True)
    say(f"profiled gloo in {time.perf_counter() - start:.1f} s")
    return profile


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
