"""The cluster profiler: collective bandwidth and latency, compute/communication interference, and
the GPUs and links NVML reports.

``profile_cluster()`` runs on every rank of an initialised process group (NCCL on GPUs, gloo on
CPUs: torchrun, Ray, or :func:`spawn_local`), in one launch: for every collective, group size and
placement (ranks inside one node, or spread over nodes), the time of messages from ``min_bytes``
to ``max_bytes``, as nccl-tests measures them (back-to-back iterations after a warm-up, the slowest
rank's time, message size = the full buffer). Without a process group it still reports the GPUs.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from galvatron.profiler.progress import Progress, human_bytes, human_seconds, table
from galvatron.profiler.schema import (
    COLLECTIVES,
    ClusterProfile,
    CollectiveProfile,
    CommPoint,
    GPUInfo,
    Overlap,
    Placement,
    ProfileError,
)

# nvidia-smi topo -m names of nvmlDeviceGetTopologyCommonAncestor levels
_PCIE_LEVELS = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


@dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    """What to measure. Sizes run ``min_bytes, min_bytes * factor, ...`` up to ``max_bytes``."""

    ops: tuple[str, ...] = COLLECTIVES
    min_bytes: int = 1 << 10
    max_bytes: int = 0
    """0: 1 GiB with NCCL, 1 MiB with gloo."""
    factor: int = 4
    group_sizes: tuple[int, ...] = ()
    """Sizes of the groups inside one node; empty: 2, 4, 8, ... and all the ranks of the node."""
    warmup: int = 2
    iters: int = 5
    overlap: bool = True
    """Measure matmul/all-reduce interference."""
    pipeline: bool = True
    """Measure the pipeline schedule's host time per action (gloo only: on GPUs the host runs ahead)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.ops) - set(COLLECTIVES))
        if unknown:
            raise ProfileError(f"unknown collective {unknown[0]!r} (known: {', '.join(COLLECTIVES)})")
        if self.min_bytes < 4 or self.factor < 2 or self.iters < 1 or self.warmup < 0:
            raise ProfileError("need min_bytes >= 4, factor >= 2, iters >= 1 and warmup >= 0")

    def sizes(self, cuda: bool) -> list[int]:
        top = self.max_bytes or (1 << 30 if cuda else 1 << 20)
        out, size = [], self.min_bytes
        while size <= top:
            out.append(size)
            size *= self.factor
        return out


GLOO_PROFILE = ClusterOptions(iters=20)
"""How CPU workers' gloo is profiled for a search (the launcher's and ``wrap(plan="auto")``'s): 20
timed runs per point, as on shared cores a collective's wait for its peers varies run to run."""


def profile_cluster(options: ClusterOptions | None = None, *, progress: bool = True) -> ClusterProfile:
    """Profile the default process group; every rank must call it and gets the whole profile back."""
    options = options or ClusterOptions()
    started = time.perf_counter()
    gpus, topology, notes = discover_gpus()
    if not dist.is_available() or not dist.is_initialized():
        notes.append("no process group: collectives not measured (run under torchrun, or `galvatron profile "
                     "cluster --nproc N`)")
        return ClusterProfile(backend="none", world_size=1, nodes=1, ranks_per_node=1, gpus=gpus,
                              topology=topology, seconds=time.perf_counter() - started, notes=tuple(notes))
    runner = _Runner(options, progress)
    collectives = runner.collectives()
    overlap = runner.overlap() if options.overlap else None
    action = runner.pipeline_action(collectives) if options.pipeline and not runner.cuda else None
    sharing = runner.compute_sharing() if not runner.cuda else None
    return ClusterProfile(
        backend=str(dist.get_backend()), world_size=runner.world, nodes=runner.nodes,
        ranks_per_node=runner.per_node, collectives=tuple(collectives), overlap=overlap,
        pipeline_action_s=action, compute_sharing=sharing, gpus=gpus,
        topology=topology, seconds=time.perf_counter() - started, notes=tuple(notes),
    )


def summary(profile: ClusterProfile) -> str:
    """Bus bandwidth and latency per collective, the overlap slowdowns and the GPUs."""
    lines = [f"{profile.world_size} rank(s) on {profile.nodes} node(s), backend {profile.backend}, "
             f"profiled in {profile.seconds:.1f} s"]
    if profile.collectives:
        rows = [[c.op, c.group_size, c.placement, human_seconds(c.latency_s), c.busbw_gbps,
                 human_bytes(c.points[-1].bytes)] for c in profile.collectives]
        lines.append(table(["collective", "ranks", "placement", "latency", "busbw GB/s", "largest"], rows))
    if profile.overlap:
        o = profile.overlap
        lost = "" if o.interference is None else f" (loses {o.interference:.2f} s of compute per s of communication)"
        lines.append(f"beside an all-reduce a matmul runs {o.compute_slowdown:.2f}x slower{lost}; "
                     f"the all-reduce {o.comm_slowdown:.2f}x")
    if profile.pipeline_action_s is not None:
        lines.append(f"pipeline schedule: {human_seconds(profile.pipeline_action_s)} of host time per chunk pass")
    for gpu in profile.gpus:
        lines.append(f"GPU {gpu.index}: {gpu.name}, {human_bytes(gpu.memory_bytes)}, {gpu.nvlinks} NVLink(s), "
                     f"PCIe gen {gpu.pcie_gen} x{gpu.pcie_width}")
    if profile.topology:
        n = len(profile.topology)
        lines.append(table(["", *(f"GPU{j}" for j in range(n))],
                           [[f"GPU{i}", *row] for i, row in enumerate(profile.topology)]))
    lines += [f"note: {n}" for n in profile.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- collectives
def merge_collectives(per_rank: Iterable[Iterable[CollectiveProfile]]) -> list[CollectiveProfile]:
    """One curve per (op, group size, placement) from every rank's: groups of one size measure at
    once, so the slower group's time is kept at each message size."""
    seen: dict[tuple, CollectiveProfile] = {}
    for curves in per_rank:
        for c in curves:
            key = (c.op, c.group_size, c.placement)
            if key in seen:
                points = zip(seen[key].points, c.points, strict=True)
                c = CollectiveProfile(op=c.op, group_size=c.group_size, placement=c.placement,  # fits the max anew
                                      points=tuple(max(a, b, key=lambda p: p.time_s) for a, b in points))
            seen[key] = c
    return list(seen.values())


class _Runner:
    """The measurements of one rank; every rank runs them in the same order."""

    def __init__(self, options: ClusterOptions, progress: bool) -> None:
        self.options = options
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cuda = "nccl" in str(dist.get_backend()).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        hosts: list[Any] = [None] * self.world
        dist.all_gather_object(hosts, socket.gethostname())
        order = list(dict.fromkeys(hosts))
        self.node_of = [order.index(h) for h in hosts]
        self.nodes = len(order)
        self.per_node = self.node_of.count(self.node_of[0])
        self.groups = self._groups()
        self.sizes = options.sizes(self.cuda)
        units = len(self.groups) * len(self.sizes) * len([o for o in options.ops if o != "p2p"])
        units += len(self._pairs()) * len(self.sizes) if "p2p" in options.ops else 0
        self.bar = Progress(units, "profile cluster", enabled=progress and self.rank == 0)

    def _groups(self) -> list[tuple[list[int], str, Any]]:
        """(ranks, placement, process group) of this rank for every group size measured (ranks empty
        where it is in no group of that size); every group is created on every rank. Intra-node
        groups partition node 0's ranks and measure at once, as a step's data- or tensor-parallel
        groups communicate together (on CPU workers that share cores, idle neighbours would hide
        the competition for them)."""
        local = [r for r in range(self.world) if self.node_of[r] == 0]
        powers = tuple(2**i for i in range(1, int(math.log2(len(local))) + 1))
        sizes = self.options.group_sizes or (*powers, len(local))
        specs = [([local[i:i + k] for i in range(0, len(local) - k + 1, k)], Placement.INTRA)
                 for k in sorted(set(sizes)) if 2 <= k <= len(local)]
        if self.nodes > 1:
            leaders = [next(r for r in range(self.world) if self.node_of[r] == n) for n in range(self.nodes)]
            specs += [([leaders], Placement.INTER), ([list(range(self.world))], Placement.INTER)]
        out = []
        for parts, placement in specs:
            mine: tuple[list[int], Any] = ([], None)
            for ranks in parts:
                group = None if len(ranks) == self.world else dist.new_group(ranks)
                if self.rank in ranks:
                    mine = (ranks, group)
            out.append((mine[0], placement, mine[1]))
        return out

    def _pairs(self) -> list[tuple[list[tuple[int, int]], str]]:
        """The rank pairs that ping at once, per placement. Intra-node: every node's ranks in
        consecutive pairs, all at once, as a pipeline's stages hand off together (on CPU workers
        that share cores, a handoff waits for the peer to be scheduled, which an idle machine hides).
        Inter-node: rank 0 and the first rank of node 1."""
        out = []
        if self.per_node >= 2:
            pairs = []
            for node in range(self.nodes):
                ranks = [r for r in range(self.world) if self.node_of[r] == node]
                pairs += [(ranks[i], ranks[i + 1]) for i in range(0, len(ranks) - 1, 2)]
            out.append((pairs, Placement.INTRA))
        if self.nodes > 1:
            out.append(([(0, next(r for r in range(self.world) if self.node_of[r] == 1))], Placement.INTER))
        return out

    def collectives(self) -> list[CollectiveProfile]:
        out = []
        for ranks, placement, group in self.groups:
            for op in self.options.ops:
                if op == "p2p":
                    continue
                points = []
                for nbytes in self.sizes:
                    if self.rank in ranks:
                        points.append(CommPoint(bytes=nbytes, time_s=self._time(op, nbytes, ranks, group)))
                    self.bar.step(f"{op} x{len(ranks)} {human_bytes(nbytes)}")
                if points:
                    out.append(CollectiveProfile(op=op, group_size=len(ranks), placement=placement,
                                                 points=tuple(points)))
        if "p2p" in self.options.ops:
            out += self._p2p()
        return self._share(out)

    def _time(self, op: str, nbytes: int, ranks: list[int], group: Any) -> float:
        """Seconds of one ``op`` of ``nbytes`` on the group: the slowest member's average."""
        run = _collective(op, nbytes, len(ranks), group, self.device)
        return self._timed(run, group)

    def _timed(self, run: Callable[[], None], group: Any) -> float:
        for _ in range(self.options.warmup):
            run()
        self._sync()
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(self.options.iters):
            run()
        self._sync()
        elapsed = torch.tensor([(time.perf_counter() - start) / self.options.iters], device=self.device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
        return float(elapsed.item())

    def _p2p(self) -> list[CollectiveProfile]:
        """Ping-pong within each pair of :meth:`_pairs`: one-way time is half the round trip; the
        slowest pair's is kept."""
        out = []
        for pairs, placement in self._pairs():
            mine = next(((a, b) for a, b in pairs if self.rank in (a, b)), None)
            points = []
            for nbytes in self.sizes:
                seconds = 0.0
                if mine is not None:
                    a, b = mine
                    buf = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=self.device)
                    peer = b if self.rank == a else a

                    def ping(buf: torch.Tensor = buf, peer: int = peer, first: bool = self.rank == a) -> None:
                        for send in (first, not first):
                            (dist.send if send else dist.recv)(buf, peer)

                    seconds = self._pair_time(ping) / 2
                slowest = torch.tensor([seconds], device=self.device)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                points.append(CommPoint(bytes=nbytes, time_s=float(slowest.item())))
                self.bar.step(f"p2p {placement} {human_bytes(nbytes)}")
            if self.rank == 0:
                out.append(CollectiveProfile(op="p2p", group_size=2, placement=placement, points=tuple(points)))
        return out

    def _pair_time(self, ping: Callable[[], None]) -> float:
        for _ in range(self.options.warmup):
            ping()
        self._sync()
        start = time.perf_counter()
        for _ in range(self.options.iters):
            ping()
        self._sync()
        return (time.perf_counter() - start) / self.options.iters

    def _share(self, mine: list[CollectiveProfile]) -> list[CollectiveProfile]:
        """Every rank's measurements, gathered so each rank returns the whole profile."""
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, [c.to_dict() for c in mine])
        return merge_collectives([CollectiveProfile.from_dict(d) for d in rank_list] for rank_list in everyone)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------------------ compute sharing
    SHARING_ROUNDS = 3
    """Alternations of all ranks computing at once and rank 0 alone (medians over them)."""

    def compute_sharing(self) -> float:
        """CPU workers: a small MLP's forward and backward (hidden 256, 1024 wide, 256 tokens, fp32,
        one thread) timed on every rank of the node at once and on rank 0 alone while the others wait
        at a barrier, alternately; the median over the ranks of their shared times over rank 0's time
        alone. On a 2-core machine with 4 workers this came to 2.13-2.19, where the demo model's own
        step stretched 2.05-2.13 and ``workers / cores`` says 2."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            gen = torch.Generator().manual_seed(0)
            up, down = torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256)
            x = torch.randn(256, 256, generator=gen, requires_grad=True)

            def step() -> None:
                y = down(torch.nn.functional.gelu(up(torch.nn.functional.layer_norm(x, (256,)))))
                y.sum().backward()

            def timed(k: int) -> float:
                times = []
                for _ in range(k):
                    start = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - start)
                return statistics.median(times)

            for _ in range(3):
                step()
            k = 20
            shared, alone = [], []
            for _ in range(self.SHARING_ROUNDS):
                dist.barrier()
                shared.append(timed(k))
                dist.barrier()
                if self.rank == 0:
                    alone.append(timed(k))
                dist.barrier()
            mine = torch.tensor([statistics.median(shared)])
            every = [torch.zeros(1) for _ in range(self.world)]
            dist.all_gather(every, mine)
            ratio = torch.tensor([statistics.median(float(t) for t in every) / statistics.median(alone)
                                  if self.rank == 0 else 0.0])
            dist.broadcast(ratio, src=0)
            return float(ratio)
        finally:
            torch.set_num_threads(threads)

    # ------------------------------------------------------------------------------ pipeline
    PIPELINE_CHUNKS = (1, 4)
    """Chunks per rank of the two pipelines :meth:`pipeline_action` times (same blocks, same work)."""

    def pipeline_action(self, collectives: Sequence[CollectiveProfile]) -> float | None:
        """Host seconds per pipeline action besides compute and handoffs: galvatron's runtime runs a
        model with almost no compute (8 blocks of width 8) as a 2-stage pipeline over every rank
        (pp 2 x dp world/2), 4 micro-batches, with 1 and with 4 chunks per rank: the same blocks and
        work, 24 more actions per rank (8 -> 32 chunk passes). The two run alternately, a step of
        each per round, and the median of the rounds' differences is taken (on shared cores the
        step times drift by more than the difference: two medians taken one after the other gave
        0.35 to 2.3 ms per action over three profiles), less the handoffs the extra chunk boundaries
        add as the cost model prices them (6 more boundary ends per micro-batch and rank, each an
        activation and a gradient at the smallest measured p2p time), over 24. None with an odd
        number of ranks."""
        if self.world % 2:
            return None
        import galvatron
        from galvatron.models.gpt import GPT, GPTConfig
        from galvatron.plan import Plan

        p2p = next((c.points[0].time_s for c in collectives if c.op == "p2p"), 0.0)
        dp, m, layers = self.world // 2, 4, 8
        steps = []
        for v in self.PIPELINE_CHUNKS:
            torch.manual_seed(0)
            net = GPT(GPTConfig(layers=layers, hidden=8, heads=1, vocab=16, seq_len=4, ffn_hidden=8))
            plan = Plan.uniform(layers, global_batch_size=m * dp, num_micro_batches=m, pp=2, virtual_stages=v,
                                schedule="interleaved-1f1b" if v > 1 else "1f1b", dtype="fp32", dp=dp)
            model = galvatron.wrap(net, plan)
            tokens = torch.randint(0, 16, (m * dp, 5), generator=torch.Generator().manual_seed(0))
            batch = model.shard_batch((tokens[:, :-1], tokens[:, 1:]))

            def step(model: Any = model, batch: Any = batch) -> None:
                model.train_step(batch, lambda out, y: torch.nn.functional.cross_entropy(out.flatten(0, 1),
                                                                                          y.flatten()))
                model.zero_grad(set_to_none=True)

            steps.append(step)
        for _ in range(self.options.warmup):
            for step in steps:
                step()
        diffs = []
        for _ in range(max(self.options.iters, 10)):
            elapsed = []
            for step in steps:
                dist.barrier()
                start = time.perf_counter()
                step()
                elapsed.append(time.perf_counter() - start)
            diffs.append(elapsed[1] - elapsed[0])
        extra = torch.tensor([statistics.median(diffs)])
        dist.all_reduce(extra, op=dist.ReduceOp.MAX)
        return pipeline_action_seconds(float(extra.item()), p2p, m, self.PIPELINE_CHUNKS)

    # ------------------------------------------------------------------------------ overlap
    def overlap(self) -> Overlap | None:
        """Matmuls beside all-reduces on the largest intra-node group, each timed alone and together:
        on GPUs a bf16 matmul stream beside an all-reduce stream; on CPUs fp32 matmuls on this thread
        beside asynchronous gloo all-reduces (whose threads copy and reduce on the same cores)."""
        ranks, _, group = max((g for g in self.groups if g[1] == Placement.INTRA), key=lambda g: len(g[0]),
                              default=(list(range(self.world)), Placement.INTRA, None))
        if len(ranks) < 2 or self.rank not in ranks:
            dist.barrier()
            return None
        if not self.cuda:
            return self._cpu_overlap(ranks, group)
        n, message = 8192, 256 << 20
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        c = torch.empty_like(a)
        buf = torch.zeros(message // 2, device=self.device, dtype=torch.bfloat16)
        compute, comm = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)

        def matmuls(k: int) -> None:
            for _ in range(k):
                torch.mm(a, a, out=c)

        def reduces(j: int) -> None:
            for _ in range(j):
                dist.all_reduce(buf, group=group)

        one_mm = statistics.median(_stream_time(compute, lambda: matmuls(1)) for _ in range(3))
        one_ar = statistics.median(_stream_time(comm, lambda: reduces(1)) for _ in range(3))
        k = 10
        j = torch.tensor([max(1, round(k * one_mm / max(one_ar, 1e-6)))], device=self.device)
        dist.all_reduce(j, op=dist.ReduceOp.MAX, group=group)
        jobs = int(j.item())
        alone_mm = _stream_time(compute, lambda: matmuls(k))
        alone_ar = _stream_time(comm, lambda: reduces(jobs))
        dist.barrier(group=group)
        both_mm, both_ar = _together(compute, lambda: matmuls(k), comm, lambda: reduces(jobs))
        return self._overlap_result(ranks, group, (alone_mm, alone_ar, both_mm, both_ar), n, message)

    def _cpu_overlap(self, ranks: list[int], group: Any) -> Overlap:
        n, message = 256, 1 << 20
        a = torch.randn(n, n)
        c = torch.empty_like(a)
        buf = torch.zeros(message // 4)

        def matmuls(k: int) -> None:
            for _ in range(k):
                torch.mm(a, a, out=c)

        def reduces(j: int) -> list[Any]:
            return [dist.all_reduce(buf, group=group, async_op=True) for _ in range(j)]

        def timed(work: Callable[[], None]) -> float:
            dist.barrier(group=group)
            start = time.perf_counter()
            work()
            return time.perf_counter() - start

        one_mm = statistics.median(timed(lambda: matmuls(10)) for _ in range(3)) / 10
        one_ar = statistics.median(timed(lambda: [w.wait() for w in reduces(1)]) for _ in range(3))
        k = max(10, round(0.1 / max(one_mm, 1e-9)))  # about 0.1 s of matmuls
        j = torch.tensor([max(1, round(k * one_mm / max(one_ar, 1e-9)))])
        dist.all_reduce(j, op=dist.ReduceOp.MAX, group=group)
        jobs = int(j.item())

        def together() -> tuple[float, float]:
            dist.barrier(group=group)
            start = time.perf_counter()
            works = reduces(jobs)
            matmuls(k)
            both_mm = time.perf_counter() - start
            for w in works:
                w.wait()
            return both_mm, time.perf_counter() - start

        runs = [(timed(lambda: matmuls(k)), timed(lambda: [w.wait() for w in reduces(jobs)]), *together())
                for _ in range(min(self.options.iters, 5))]  # medians: time-shared cores are noisy
        times = tuple(statistics.median(run[i] for run in runs) for i in range(4))
        return self._overlap_result(ranks, group, times, n, message)

    def _overlap_result(self, ranks: list[int], group: Any, times: tuple[float, float, float, float], n: int,
                        message: int) -> Overlap:
        """The group's worst rank's slowdowns and interference from (matmuls alone, all-reduces alone,
        matmuls beside all-reduces, all-reduces beside matmuls)."""
        alone_mm, alone_ar, both_mm, both_ar = times
        result = torch.tensor([both_mm / alone_mm, both_ar / alone_ar, max(both_mm - alone_mm, 0.0) / alone_ar],
                              device=self.device)
        dist.all_reduce(result, op=dist.ReduceOp.MAX, group=group)
        dist.barrier()
        return Overlap(compute_slowdown=float(result[0]), comm_slowdown=float(result[1]), matmul_size=n,
                       message_bytes=message, group_size=len(ranks), interference=float(result[2]))


def _collective(op: str, nbytes: int, n: int, group: Any, device: torch.device) -> Callable[[], None]:
    """A closure running ``op`` once on buffers of ``nbytes`` (the full buffer, nccl-tests' size)."""
    numel = max(nbytes // 4 // n, 1) * n
    full = torch.ones(numel, dtype=torch.float32, device=device)
    part = torch.ones(numel // n, dtype=torch.float32, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    if op == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    if op == "all_gather":
        return lambda: gather(full, part, group=group)
    if op == "reduce_scatter":
        return lambda: scatter(part, full, group=group)
    if op == "all_to_all":
        out = torch.empty_like(full)
        return lambda: dist.all_to_all_single(out, full, group=group)
    raise ProfileError(f"no collective {op!r}")


def _stream_time(stream: torch.cuda.Stream, work: Callable[[], None]) -> float:
    """Seconds ``work`` takes on ``stream``."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record()
        work()
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def _together(s1: torch.cuda.Stream, w1: Callable[[], None], s2: torch.cuda.Stream,
              w2: Callable[[], None]) -> tuple[float, float]:
    """Seconds of ``w1`` on ``s1`` and ``w2`` on ``s2`` started at once."""
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    with torch.cuda.stream(s1):
        events[0].record()
    with torch.cuda.stream(s2):
        events[2].record()
    with torch.cuda.stream(s1):
        w1()
        events[1].record()
    with torch.cuda.stream(s2):
        w2()
        events[3].record()
    torch.cuda.synchronize()
    return events[0].elapsed_time(events[1]) / 1e3, events[2].elapsed_time(events[3]) / 1e3


# ------------------------------------------------------------------------------------- NVML
def discover_gpus(nvml: Any = None) -> tuple[tuple[GPUInfo, ...], tuple[tuple[str, ...], ...], list[str]]:
    """The node's GPUs, their ``nvidia-smi topo -m`` matrix and notes. Without NVML (no driver, no
    GPU: ``NVMLError``/LibraryNotFound, or no ``pynvml``) there are no GPUs and a note says why."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return (), (), ["pynvml (nvidia-ml-py) is not installed: no GPU discovery"]
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as err:  # LibraryNotFound without a driver
        return (), (), [f"NVML unavailable ({type(err).__name__}): zero GPUs"]
    try:
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        links = [_nvlink_peers(nvml, h) for h in handles]
        buses = [_text(nvml.nvmlDeviceGetPciInfo(h).busId).lower() for h in handles]
        gpus = tuple(_gpu_info(nvml, i, h, sum(links[i].values())) for i, h in enumerate(handles))
        topo = tuple(tuple(_link_name(nvml, handles, links, buses, i, j) for j in range(len(handles)))
                     for i in range(len(handles)))
        return gpus, topo, []
    except nvml.NVMLError as err:
        return (), (), [f"NVML query failed ({err}): zero GPUs"]
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(fn: Callable[..., Any], *args: Any, nvml: Any, default: Any = 0) -> Any:
    """An NVML query that some GPUs do not support."""
    try:
        return fn(*args)
    except nvml.NVMLError:
        return default


def _gpu_info(nvml: Any, index: int, handle: Any, nvlinks: int) -> GPUInfo:
    return GPUInfo(
        index=index, name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total), nvlinks=nvlinks,
        pcie_gen=int(_optional(nvml.nvmlDeviceGetMaxPcieLinkGeneration, handle, nvml=nvml)),
        pcie_width=int(_optional(nvml.nvmlDeviceGetMaxPcieLinkWidth, handle, nvml=nvml)),
    )


def _nvlink_peers(nvml: Any, handle: Any) -> dict[str, int]:
    """Active NVLinks by the PCI bus id at their far end (a GPU, or an NVSwitch)."""
    peers: dict[str, int] = {}
    for link in range(int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))):
        state = _optional(nvml.nvmlDeviceGetNvLinkState, handle, link, nvml=nvml, default=None)
        if state != getattr(nvml, "NVML_FEATURE_ENABLED", 1):
            continue
        remote = _optional(nvml.nvmlDeviceGetNvLinkRemotePciInfo, handle, link, nvml=nvml, default=None)
        bus = _text(remote.busId).lower() if remote is not None else "?"
        peers[bus] = peers.get(bus, 0) + 1
    return peers


def _link_name(nvml: Any, handles: Sequence[Any], links: Sequence[dict[str, int]], buses: Sequence[str],
               i: int, j: int) -> str:
    """``X``, ``NV<n>`` (direct links, or links to NVSwitches that both GPUs reach), else the PCIe level."""
    if i == j:
        return "X"
    direct = links[i].get(buses[j], 0)
    if direct:
        return f"NV{direct}"
    switch_i = sum(n for bus, n in links[i].items() if bus not in buses)
    switch_j = sum(n for bus, n in links[j].items() if bus not in buses)
    if switch_i and switch_j:
        return f"NV{min(switch_i, switch_j)}"
    level = _optional(nvml.nvmlDeviceGetTopologyCommonAncestor, handles[i], handles[j], nvml=nvml, default=None)
    return _PCIE_LEVELS.get(int(level), "SYS") if level is not None else "SYS"


# ------------------------------------------------------------------------------ local launch
def spawn_local(nproc: int, options: ClusterOptions, out: str, *, progress: bool = True,
                timeout: float = 600.0, cpu: bool = False) -> ClusterProfile:
    """Start ``nproc`` processes on this machine (one per GPU with NCCL; gloo on CPU without GPUs or
    with ``cpu``), profile them together and return the profile (also written to ``out``). gloo binds
    to the loopback device unless ``GLOO_SOCKET_IFNAME`` is set."""
    import torch.multiprocessing as mp

    if nproc < 2:
        raise ProfileError("spawn_local needs at least 2 processes")
    if not cpu and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ProfileError(f"{nproc} processes but only {torch.cuda.device_count()} GPU(s) visible")
    with tempfile.TemporaryDirectory(prefix="galvatron-cluster-") as tmp:
        mp.start_processes(_spawned, args=(nproc, os.path.join(tmp, "store"), options, out, progress, timeout, cpu),
                           nprocs=nproc, start_method="spawn", join=True)
    return ClusterProfile.load(out)


def _spawned(rank: int, nproc: int, store_path: str, options: ClusterOptions, out: str, progress: bool,
             timeout: float, cpu: bool = False) -> None:
    cuda = torch.cuda.is_available() and not cpu
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every process is on this machine
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc))
    store = dist.FileStore(store_path, nproc)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=nproc,
                            timeout=timedelta(seconds=timeout))
    try:
        profile = profile_cluster(options, progress=progress)
        if rank == 0:
            profile.save(out)
    finally:
        dist.destroy_process_group()


def pipeline_action_seconds(extra_s: float, p2p_s: float, micro_batches: int, chunks: tuple[int, int]) -> float:
    """Host seconds per pipeline action from the step-time difference ``extra_s`` between a pipeline
    of ``chunks[1]`` and one of ``chunks[0]`` chunks per rank (:meth:`_Runner.pipeline_action`): less
    the handoffs the extra chunk boundaries add as the cost model prices them (per micro-batch and
    rank, two boundary ends per extra chunk, each an activation and a gradient at ``p2p_s``), over the
    extra actions (a forward and a backward per extra chunk and micro-batch). 0 when the handoffs take
    all of it (on a loaded machine the difference can drown in noise)."""
    extra_chunks = chunks[1] - chunks[0]
    actions = 2 * micro_batches * extra_chunks
    handoffs = 2 * extra_chunks * micro_batches * 2 * p2p_s
    return max(extra_s - handoffs, 0.0) / actions

