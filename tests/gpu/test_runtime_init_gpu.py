"""What ``galvatron.wrap`` allocates on the GPU while it builds a model (2 GPUs, NCCL; skipped
without them): a model on the CPU peaks at what the rank keeps plus about one module sharded at a
time, below the whole model that ``model.to(device)`` first held; a model on the meta device
allocates only what the rank keeps."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from galvatron.models import GPT, GPTConfig
from galvatron.models.gpt import rope_cache
from galvatron.plan import Plan
from galvatron.testing import run_ranks

pytestmark = pytest.mark.gpu

WORLD, LAYERS = 2, 8
PLANS = {
    "zero3": Plan.uniform(LAYERS, global_batch_size=4, dtype="fp32", dp=2, zero=3),
    "tp2-sp": Plan.uniform(LAYERS, global_batch_size=4, dtype="fp32", dp=1, tp=2, sp=True),
}


def _build() -> nn.Module:
    torch.manual_seed(0)
    return GPT(GPTConfig(layers=LAYERS, hidden=512, heads=8, vocab=8192, seq_len=64))


def _bytes(tensors: Any) -> int:
    local = (t.to_local() if hasattr(t, "to_local") else t for t in tensors)
    return sum(t.numel() * t.element_size() for t in local)


def _peaks() -> dict[str, dict[str, int]]:
    """Per plan and build device: the allocated peak while wrapping and what the rank keeps."""
    import galvatron

    out = {}
    for name, plan in PLANS.items():
        for where in ("cpu", "meta"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            with torch.device(where):
                model = _build()
            if where == "meta":
                model.rope_cos, model.rope_sin = rope_cache(model.config.seq_len, 512 // 8)
            model = galvatron.wrap(model, plan)
            torch.cuda.synchronize()
            out[f"{name}-{where}"] = {"peak": torch.cuda.max_memory_allocated() - before,
                                      "kept": _bytes([*model.parameters(), *model.buffers()])}
            del model
    return out


def test_wrap_holds_only_shards_on_the_gpu() -> None:
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs")
    model = _build()
    whole = _bytes(model.parameters())
    largest = max(_bytes(m.parameters()) for m in [*model.blocks, model.tok_embeddings, model.head])
    for rank in run_ranks(_peaks, WORLD, backend="nccl", timeout=300):
        for case, got in rank.items():
            assert got["kept"] < 0.75 * whole, (case, got)
            slack = 1 << 20 if case.endswith("meta") else 2 * largest + (1 << 20)
            assert got["peak"] <= got["kept"] + slack, (case, got, whole)
