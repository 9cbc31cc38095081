"""The allocation tracer (``galvatron.profiler.memory_trace``): a step on fake tensors logs the same
allocations, in the same order, as the step on real ones; storage resizes (FSDP2's), DTensor shards,
side streams and the GPU's fused RMSNorm are counted as a GPU's allocator sees them. Its accuracy
against real GPU runs is measured in benchmarks/results/fake_memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from galvatron.profiler.memory_trace import AllocationTracer, cuda_kernels, trace_steps
from galvatron.strategies.cost.allocator import replay
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from galvatron.testing import fake_group


def mlp_step(fake_mode: FakeTensorMode | None) -> tuple[object, list[torch.Tensor]]:
    """A two-layer MLP's training step (SGD with momentum), built on fake tensors if ``fake_mode``."""
    torch.manual_seed(0)
    with fake_mode or torch.device("cpu"):
        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        x = torch.randn(32, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step() -> None:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    return step, [*model.parameters(), x]


def sizes(events: list) -> list[tuple[str, int, str]]:
    return [(e.action, e.size, e.op) for e in events]


def real_and_fake(build: Callable[[FakeTensorMode | None], tuple[Any, list[torch.Tensor]]]) -> tuple[list, list]:
    """Two steps of ``build``'s step traced on real tensors, then on fake ones."""
    step, tensors = build(None)
    real = trace_steps(step, None, tensors, steps=2, attention=None)
    fake_mode = FakeTensorMode()
    step, tensors = build(fake_mode)
    return real, trace_steps(step, fake_mode, tensors, steps=2, attention=None)


def test_fake_step_allocates_as_the_real_one() -> None:
    real, fake = real_and_fake(mlp_step)
    assert sizes(fake) == sizes(real)
    ops = {e.op for e in fake}
    assert "aten.addmm.default" in ops and "aten.gelu_backward.default" in ops
    # parameters and input adopted first (4 parameters and x), then the steps; momentum buffers stay
    assert [e.size for e in fake[:5]] == [64 * 256 * 4, 256 * 4, 256 * 64 * 4, 64 * 4, 32 * 64 * 4]
    stats = replay([e[:4] for e in fake])
    params = (64 * 256 * 2 + 256 + 64) * 4
    assert stats.allocated_peak > 3 * params  # parameters, gradients and momentum at once


def test_gradient_sums_reuse_an_input_as_untraced() -> None:
    """A residual connection and a tied embedding sum two gradients of one tensor. Untraced, autograd
    adds them in place; under any dispatch mode (the tracer) it allocates the sum: the log folds each
    such sum into the input it replaces, so a residual block's step logs no sum in the backward."""

    def tied_step(fake_mode: FakeTensorMode | None) -> tuple[object, list[torch.Tensor]]:
        torch.manual_seed(0)
        with fake_mode or torch.device("cpu"):
            embed, inner = nn.Embedding(128, 64), nn.Linear(64, 64)
            tokens = torch.randint(0, 128, (16, 8))
        params = [*embed.parameters(), *inner.parameters()]

        def step() -> None:
            x = embed(tokens)
            x = x + inner(x)  # the residual: x's gradient is a sum
            logits = x @ embed.weight.t()  # tied: the embedding weight's gradient is a sum
            logits.float().logsumexp(-1).mean().backward()
            for p in params:
                p.grad = None

        return step, [*params, tokens]

    real, fake = real_and_fake(tied_step)
    assert sizes(fake) == sizes(real)
    adds = [e for e in fake if e.op == "aten.add.Tensor"]
    assert len(adds) == 2, "the forward's residual add of each step, no gradient sum"


def test_a_step_traces_the_same_every_time() -> None:
    traces = []
    for _ in range(2):
        fake_mode = FakeTensorMode()
        step, tensors = mlp_step(fake_mode)
        traces.append(sizes(trace_steps(step, fake_mode, tensors, steps=2, attention=None)))
    assert traces[0] == traces[1]


def test_storage_resizes_free_and_allocate() -> None:
    t = torch.empty(1024)
    tracer = AllocationTracer()
    tracer.adopt([t])
    with tracer:
        t.untyped_storage().resize_(0)  # FSDP2's free_storage
        t.untyped_storage().resize_(4096)  # alloc_storage
    actions = [(e.action, e.size) for e in tracer.events]
    assert actions == [("alloc", 4096), ("free", 4096), ("alloc", 4096)]


def test_side_streams_keep_their_allocations() -> None:
    tracer = AllocationTracer()
    side = torch.cpu.Stream()
    with tracer:
        with torch.cpu.stream(side):
            a = torch.ones(256)
        b = torch.ones(256)
        del a, b
    streams = {(e.action, e.stream) for e in tracer.events}
    assert streams == {("alloc", 1), ("free", 1), ("alloc", 0), ("free", 0)}


def test_dtensor_ops_allocate_their_local_shards() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with fake_group(4):
        mesh = init_device_mesh("cpu", (4,))
        d = distribute_tensor(torch.ones(64, 32), mesh, [Shard(0)])
        with AllocationTracer() as tracer:
            e = torch.zeros_like(d) + d
        del e
    allocs = [e.size for e in tracer.events if e.action == "alloc"]
    assert allocs and all(size == 16 * 32 * 4 for size in allocs)  # the 16-row shard, never 64 rows


def test_cuda_kernels_keep_what_the_fused_rms_norm_keeps() -> None:
    fake_mode = FakeTensorMode()
    with fake_mode:
        norm = nn.RMSNorm(128)
        x = torch.randn(8, 128, requires_grad=True)
    with fake_mode, cuda_kernels(), AllocationTracer(fake_mode) as tracer:
        y = norm(x)
        y.sum().backward()
    allocs = [(e.size, e.op) for e in tracer.events if e.action == "alloc"]
    forward = allocs[:2]
    assert sorted(size for size, _ in forward) == [8 * 4, 8 * 128 * 4]  # inverse RMS per row, output
    assert not any("pow" in op or "rsqrt" in op for _, op in allocs)  # no composite temporaries
    assert x.grad is not None and norm.weight.grad is not None
    assert F.rms_norm is not None and F.rms_norm.__module__ == "torch.nn.functional"  # restored


def test_cuda_kernels_route_attention_to_the_fused_kernel() -> None:
    fake_mode = FakeTensorMode()
    with fake_mode:
        q = torch.randn(2, 4, 128, 32, dtype=torch.bfloat16, requires_grad=True)
    with fake_mode, cuda_kernels("flash"), AllocationTracer(fake_mode) as tracer:
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    ops = {e.op for e in tracer.events}
    assert "aten._scaled_dot_product_flash_attention.default" in ops
    assert not any("softmax" in op for op in ops)  # no score matrix
    # GQA: K and V keep their two heads (cuDNN's kernel takes them so on an H100, gqa_attention.json)
    with fake_mode:
        kv = torch.randn(2, 2, 128, 32, dtype=torch.bfloat16, requires_grad=True)
    with fake_mode, cuda_kernels("cudnn"), AllocationTracer(fake_mode) as tracer:
        F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).sum().backward()
    ops = {e.op for e in tracer.events}
    assert "aten._scaled_dot_product_cudnn_attention.default" in ops
    assert not any("softmax" in op or "repeat" in op or "expand" in op for op in ops)
    assert kv.grad is not None and kv.grad.shape == kv.shape
    with pytest.raises(TypeError, match="fake tensors"), cuda_kernels():
        F.rms_norm(torch.ones(2, 4), (4,), torch.ones(4))


def test_a_step_with_value_dependent_shapes_is_a_clear_error() -> None:
    from galvatron.profiler.memory_trace import trace_plan

    from galvatron.models import GPT, GPTConfig
    from galvatron.plan import Plan

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    moe = GPTConfig(layers=2, hidden=32, heads=4, vocab=64, seq_len=16, ffn_hidden=64, experts=4, top_k=2)
    with pytest.raises(ValueError, match="depend on values"):
        trace_plan(lambda: GPT(moe), Plan.uniform(2, global_batch_size=2, dp=2), world=2, seq_len=16, vocab=64)
    assert not dist.is_initialized()


def test_a_functional_collectives_wait_returns_its_input() -> None:
    """``wait_tensor`` hands back the tensor it waited on, as on a device: one allocation per gather."""
    import torch.distributed._functional_collectives as funcol

    with fake_group(2):
        fake_mode = FakeTensorMode()
        with fake_mode:
            x = torch.ones(8, 4)
        with fake_mode, AllocationTracer(fake_mode) as tracer:
            gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
            out = gather(x, 0, dist.group.WORLD)
            out = out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out
            assert out.shape == (16, 4)
    assert [e.size for e in tracer.events if e.action == "alloc"] == [16 * 4 * 4]


def test_a_plan_traced_as_built_on_the_meta_device_or_the_device() -> None:
    """``trace_plan``: built where it runs, the whole model is allocated before ``wrap`` shards it; built
    on the meta device, only the rank's shards (here ZeRO-3 over 4 ranks: a quarter of the parameters,
    well under the whole model). Tracing 2 of a step's 8 micro-batches reaches the same peak."""
    from galvatron.profiler.memory_trace import trace_plan

    from galvatron.models import GPT, GPTConfig
    from galvatron.plan import Plan

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    cfg = GPTConfig(layers=2, hidden=256, heads=4, vocab=4096, seq_len=16, ffn_hidden=1024)
    plan = Plan.uniform(2, global_batch_size=32, num_micro_batches=8, dp=4, zero=3, dtype="bf16")
    params = sum(p.numel() for p in GPT(cfg).parameters()) * 4

    def trace(**kw: object) -> object:
        return trace_plan(lambda: GPT(cfg), plan, world=4, seq_len=16, vocab=4096, steps=2, **kw)

    device, meta = trace(build_on="device"), trace(build_on="meta")
    first = next(i for i, e in enumerate(meta.events) if e.op)  # after the adopted shards
    assert sum(e.size for e in device.events[:first] if e.action == "alloc") >= params
    assert sum(e.size for e in meta.events[:first] if e.action == "alloc") < params / 2
    assert device.allocated_peak >= meta.allocated_peak
    every = trace(build_on="meta", micro_batches=None)
    assert len(every.events) > len(meta.events)
    assert (every.allocated_peak, every.reserved_peak) == (meta.allocated_peak, meta.reserved_peak)
    assert not dist.is_initialized()
