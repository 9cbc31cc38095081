"""From per-layer costs to one training step: device-group totals, pipeline bubble, memory peak.

These few functions are shared by :func:`strategies.cost.cost_plan` and the search, so the search
optimises exactly what the cost model reports.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from galvatron.strategies.cost.options import CostOptions

from galvatron.plan import Schedule, warmup_forwards

# indices into LayerCost.vector()
FB, WGRAD, BWD_COMPUTE, SYNC, POST, OPTIM, STATIC, ACT, GRADS, FWD, HOST_FWD, HOST_BWD, GRAD_WORK = range(13)
VECTOR_LEN = 13


@dataclass(frozen=True)
class GroupTotals:
    """One device group's share of a step: per-micro-batch time ``t``, its bubble weight ``b``,
    the once-per-step tail ``e`` (exposed gradient sync and optimizer) and peak memory."""

    t: float
    b: float
    e: float
    memory: float
    activations: float
    exposed_sync: float


def in_flight(schedule: Schedule, pp: int, v: int, m: int, group: int) -> float:
    """Micro-batches of activations a device group holds at its peak, in units of one micro-batch
    through all its ``v`` chunks. GPipe keeps all ``m`` (Huang et al. 2019); 1F1B and ZB-H1 keep
    ``pp - group`` (Narayanan et al. SC'21 §2.2.1; Qi et al. 2023 §3); interleaved 1F1B warms up
    ``2(pp - group - 1) + (v - 1) pp + 1`` chunk micro-batches (Megatron-LM schedules.py), which is
    ``pp + (pp-1)/v`` micro-batches on the first group (Korthikanti et al. 2022 §4.2.3)."""
    if schedule is Schedule.GPIPE:
        return float(m)
    return min(m * v, warmup_forwards(pp, v, m, group) + 1) / v


@functools.lru_cache(maxsize=4096)
def chunk_in_flight(schedule: Schedule, pp: int, v: int, m: int, group: int) -> np.ndarray:
    """Micro-batches of activations each of device group ``group``'s ``v`` chunks holds at the
    instants its activations can peak, one row per instant (shape ``(instants, v)``; read-only).

    A chunk's micro-batch is held from its forward to its backward. With one chunk the row is
    :func:`in_flight`. With virtual stages the group runs Megatron-LM's interleaved order (as
    :func:`galvatron.report.schedule.pass_order`, which a test replays against this): forwards in
    rounds of ``pp`` micro-batches through chunks ``0 .. v-1``, backwards through ``v-1 .. 0``,
    ``2(pp - group - 1) + (v - 1) pp`` warm-up forwards, then one forward and one backward. The
    candidate peaks are the states after each forward that a backward follows (after the last
    forward if none does), each once. All hold :func:`in_flight` times ``v`` chunk micro-batches (one
    forward in, one backward out), so none covers another, but they differ by chunk: the first local
    chunk is held for the most micro-batches (every one of the rounds begun, while later rounds
    start), the last for the fewest (one on the last group). Unequal chunks count by how long the
    schedule keeps them."""
    if v == 1:
        out = np.array([[in_flight(schedule, pp, 1, m, group)]])
    else:
        rounds = [min(pp, m - first) for first in range(0, m, pp)]
        forward = np.concatenate([np.repeat(np.arange(v), n) for n in rounds])
        one_hot = np.eye(v, dtype=np.int64)
        done = np.cumsum(one_hot[forward], axis=0)  # row k: forwards 0..k per chunk
        freed = np.vstack([np.zeros((1, v), dtype=np.int64), np.cumsum(one_hot[v - 1 - forward], axis=0)])
        total = m * v
        warmup = warmup_forwards(pp, v, m, group)
        if warmup == total:
            rows = done[-1:]
        else:
            k = np.arange(total - warmup)
            rows = done[warmup + k] - freed[k]
        out = np.array(sorted(set(map(tuple, rows.tolist()))), dtype=float)
    out.flags.writeable = False
    return out


def peak_activations(rows: np.ndarray, chunks: Sequence[Any]) -> Any:
    """Bytes of activations a device group holds at its peak: the largest, over :func:`chunk_in_flight`'s
    ``rows``, of each chunk's micro-batches in flight times its activations per micro-batch
    (``chunks[c]``: floats, or numpy arrays with one entry per candidate)."""
    if rows.shape[1] == 1:
        return rows[:, 0].max() * chunks[0]
    held = np.tensordot(rows, np.asarray(np.broadcast_arrays(*chunks), dtype=float), axes=1)
    out = held.max(axis=0)
    return float(out) if np.ndim(out) == 0 else out


def overlapped(comm: Any, compute: Any, interference: float, comm_slowdown: float = 1.0) -> Any:
    """Time a collective adds to the compute it runs beside: while it runs, its CTAs take
    ``interference`` of the SMs (compute seconds lost per second of the collective alone), and the
    collective itself runs ``comm_slowdown`` times slower than alone. If it ends within the compute,
    the pair ends at ``compute + interference * comm``; if not, the compute ends after
    ``T = compute / (1 - interference / comm_slowdown)`` (it lost ``interference`` per second of
    collective done), and the collective's rest ``comm - T / comm_slowdown`` runs alone. The excess
    over ``compute`` is returned (with ``comm_slowdown`` 1: ``max(comm - compute, interference *
    comm)``). Floats or numpy arrays."""
    hidden = interference * comm
    if comm_slowdown <= interference:  # no progress model for compute that stalls beside it: as if alone
        out = np.maximum(comm - compute, hidden)
    else:
        together = compute / (1.0 - interference / comm_slowdown)
        out = np.maximum(together * (1.0 - 1.0 / comm_slowdown) + comm - compute, hidden)
    return float(out) if np.ndim(out) == 0 else out


def hidden_behind(comm: Any, compute: Any, options: CostOptions) -> Any:
    """:func:`overlapped` with ``options``' interference and collective slowdown."""
    return overlapped(comm, compute, options.overlap_interference, options.overlap_comm_slowdown)


def grads_persist(options: CostOptions, micro_batches: int) -> bool:
    """Whether gradients are held all step (see ``CostOptions.persistent_grads``)."""
    return options.persistent_grads if options.persistent_grads is not None else micro_batches > 1


def memory_peak(static: Any, grads: Any, act: Any, work: Any, persist: bool, grad_work: Any = 0.0) -> Any:
    """Peak bytes of a device group: parameters and optimizer states (``static``) always; held
    gradients on top of the activations in flight and the largest transient buffer (``work``).
    Gradients that live only from the backward on replace the activations as the backward frees
    them layer by layer (each layer's activations go as its gradients come), so activations plus
    gradients peak at one end: at the loss, with every activation and the largest transient (the
    logits), or after the backward, with every gradient and ``grad_work``, a gradient being summed
    into one that exists (:func:`strategies.cost.layer.tied_gradient_sum`). Floats or numpy arrays."""
    out = static + grads + np.maximum(act + work, grad_work) if persist else \
        static + np.maximum(act + work, grads + grad_work)
    return float(out) if np.ndim(out) == 0 else out


def device_or_host(sums: Sequence[Any]) -> Any:
    """Per-micro-batch time of a device group's layers: the device's forward plus backward, unless
    the host issuing them is slower. The host runs ahead of one GPU stream, so a pass lasts as long
    as the slower of the host issuing all its kernels and the device running them (host-bound
    layers catch up behind device-bound ones); only profiles that timed the host apart know its
    share (``LayerCost.host_fwd``), otherwise it is 0 and the device's time stands."""
    host_f, host_b = sums[HOST_FWD], sums[HOST_BWD]
    both = np.maximum(sums[FWD], host_f) + np.maximum(sums[FB] - sums[FWD], host_b)
    out = np.where(host_f + host_b > 0, both, sums[FB])
    return float(out) if np.ndim(out) == 0 else out


def combine(sums: Sequence[float], work: float, p2p: float, inflight: float, zero_bubble: bool,
            options: CostOptions, persist: bool = True, act: Any = None) -> GroupTotals:
    """Totals of one device group from the sums of its layers' cost vectors (floats, or numpy arrays
    with one entry per candidate in the search). Activations in flight: ``act`` bytes where given
    (:func:`peak_activations`, chunk by chunk), else ``inflight`` times the group's per micro-batch."""
    t = device_or_host(sums) + p2p
    b = np.maximum(t - 2 * sums[WGRAD], 0.0) if zero_bubble else t
    if options.overlap_grad_reduce:
        exposed = hidden_behind(sums[SYNC], sums[BWD_COMPUTE], options)
    else:
        exposed = sums[SYNC]
    e = exposed + sums[POST] + sums[OPTIM]
    act = inflight * sums[ACT] if act is None else act
    memory = memory_peak(sums[STATIC], sums[GRADS], act, work, persist, sums[GRAD_WORK])
    return GroupTotals(t=t, b=b, e=e, memory=memory, activations=act, exposed_sync=exposed)


def step_time(groups: Sequence[GroupTotals], m: int, v: int) -> float:
    """Step time ``m * max t + (sum b - max b) / v + max e``: the bottleneck group runs all ``m``
    micro-batches, the others' fill and drain is the bubble (Narayanan et al. SC'21 Eq. 1 for equal
    groups: ``(pp - 1) / v`` micro-batch times; Qi et al. 2023: zero-bubble ZB-H1 shrinks each group's
    bubble share to ``F + B - W``), and the slowest tail of gradient sync and optimizer comes last."""
    return float(step_times(np.array([g.t for g in groups]), np.array([g.b for g in groups]),
                            np.array([g.e for g in groups]), m, v))


def step_times(t: np.ndarray, b: np.ndarray, e: np.ndarray, m: int, v: int) -> np.ndarray:
    """:func:`step_time` for arrays of shape (groups, candidates...)."""
    return m * t.max(axis=0) + (b.sum(axis=0) - b.max(axis=0)) / v + e.max(axis=0)
