"""GradientSync (data parallelism, ZeRO-0/1) in one process on a one-rank gloo group: buckets that
divide (as expert buckets do) run the same hooks, buffers and in-place averaging as dp > 1.
It must not hold gradients twice while reducing, nor keep a deleted model's parameters alive
(on 2 x H200 a second dp2 ZeRO-1 run in one process ran out of memory on the first one's)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from galvatron.runtime.data import GradientSync
from galvatron.testing import LiveBytes

WIDTH, LAYERS = 128, 4


@pytest.fixture(scope="module")
def group() -> Iterator[dist.ProcessGroup]:
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    if started:
        dist.destroy_process_group()


def _model(group: dist.ProcessGroup, hooks: bool) -> tuple[nn.Sequential, GradientSync]:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
    sync = GradientSync()
    sync.hooks_enabled = hooks
    for layer in model:
        sync.add(list(layer.parameters()), group, divide=2)
    return model, sync


def _loss(model: nn.Module) -> torch.Tensor:
    return model(torch.ones(8, WIDTH)).square().sum()


@pytest.mark.parametrize("hooks", [False, True], ids=["train_step", "backward_hooks"])
def test_gradients_averaged_in_place(group: dist.ProcessGroup, hooks: bool) -> None:
    """Reducing adds at most one bucket to the gradients (before: a flat copy of every bucket and a
    divided copy of a parameter); the averages are the gradients over the divisor."""
    torch.manual_seed(0)
    reference = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
    _loss(reference).backward()
    with LiveBytes() as live:
        model, sync = _model(group, hooks)
        _loss(model).backward()
        if not hooks:
            before = live.live
            live.reset_peak()
            sync.reduce()
            bucket = max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in model)
            assert live.peak - before <= bucket + 64
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        assert live.live <= params + grads + 64 * LAYERS
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad / 2, rtol=0, atol=0)


def test_deleted_model_is_freed(group: dist.ProcessGroup) -> None:
    """The gradient hooks hold no strong reference to the buckets, so parameters die with the model."""
    model, sync = _model(group, hooks=True)
    _loss(model).backward()
    alive = weakref.ref(model[0].weight)
    del model, sync
    gc.collect()
    assert alive() is None


def test_complete_buckets_do_not_read_counts_back(group: dist.ProcessGroup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every parameter with a local gradient: the reduction reads nothing back from the device (on a GPU
    a read-back per bucket idled it while the host unpacked the next); a bucket with an unused parameter
    reads the ranks' counts, and the parameter no rank has a gradient for keeps ``grad = None``."""
    model, sync = _model(group, hooks=False)
    _loss(model).backward()
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.numel()) or original(t))
    sync.reduce()
    assert reads == []
    model[1].bias.grad = None  # as if unused on every rank
    for p in model.parameters():
        if p.grad is not None:
            p.grad = p.grad.clone()
    sync.reduce()
    assert reads == [2]  # the one incomplete bucket's counts (weight, bias)
    assert model[1].bias.grad is None and model[1].weight.grad is not None


@pytest.mark.gpu
def test_reduce_does_not_synchronise_the_device(group: dist.ProcessGroup) -> None:
    """Unpacking complete buckets enqueues work and returns: no read-back, no blocking host-to-device
    copy (the flags), so the device never idles while the host moves to the next bucket (the CUDA
    runtime calls under the profiler: each used to call cudaStreamSynchronize once per bucket, 8 here)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))).cuda()
    sync = GradientSync()
    sync.hooks_enabled = False
    for layer in model:
        sync.add(list(layer.parameters()), group, divide=2)
    model(torch.ones(8, WIDTH, device="cuda")).square().sum().backward()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sync.reduce()
    # (the profiler itself ends with one cudaDeviceSynchronize)
    assert [e.name for e in prof.events() if e.name == "cudaStreamSynchronize"] == []
    assert all(p.grad is not None for p in model.parameters())
