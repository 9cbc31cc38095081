"""``wrap(plan="auto")``'s search (``runtime.apply.search_plan``) returns a plan the runtime runs for
the model, also where the search's fastest is one it refuses."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from galvatron.launch.launcher import native_cost_options
from galvatron.strategies.cost.model import as_perf
from galvatron.strategies.search import search
from galvatron.strategies.search.brute import with_memory

from galvatron.errors import PlanError
from galvatron.models.gpt import GPT, GPTConfig
from galvatron.plan import LayerStrategy, Plan
from galvatron.runtime.apply import (
    _first_supported,
    auto_searches,
    check_supported,
    describe,
    local_cluster,
    search_plan,
)

WORLD = 4


def _tied() -> tuple[GPT, torch.Tensor]:
    torch.manual_seed(0)
    net = GPT(GPTConfig(layers=4, hidden=32, heads=4, vocab=64, seq_len=8, ffn_hidden=64, tied_embeddings=True,
                        position="learned"))
    return net, torch.randint(0, 64, (8, 8))


@pytest.mark.parametrize("memory", [0.9, 0.6])
def test_the_search_lays_tied_ends_out_alike(memory: float) -> None:
    """Tied embeddings need the first and last pipeline stages in one weight layout: under these
    memory limits, where the search's fastest plan for a tied GPT on 4 CPU workers used to put its
    ends in different layouts (ZeRO-1 and ZeRO-3, say), each of its 16 best plans is one the runtime
    accepts, and ``search_plan`` returns the fastest."""
    net, batch = _tied()
    spec = describe(net, batch)
    cluster = local_cluster(WORLD)
    runnable, _ = auto_searches(batch.shape[0], gpu=False)
    unlimited = search(spec, cluster, runnable, native_cost_options(cluster), world_size=WORLD).best
    perf = with_memory(as_perf(cluster), memory * unlimited.peak_memory_gib)
    options = dataclasses.replace(runnable, top_k=16)
    top = search(spec, perf, options, native_cost_options(cluster), world_size=WORLD).top
    for c in top:
        check_supported(net, c.plan, spec, None)
    assert search_plan(spec, WORLD, batch, model=net, perf=perf) == top[0].plan


def test_auto_takes_the_fastest_plan_the_runtime_accepts() -> None:
    """Of the search's best plans, ``plan="auto"`` takes the fastest that ``check_supported``
    accepts for the model; when it accepts none, a PlanError names why the fastest is refused."""
    net, batch = _tied()
    spec = describe(net, batch)
    good = Plan.uniform(4, global_batch_size=8, dp=WORLD)
    refused = Plan.from_dict({**good.to_dict(), "head": {"tp": 2, "dp": 2}})  # the tied head apart from the embedding
    assert refused.head_strategy == LayerStrategy(dp=2, tp=2)
    top = [SimpleNamespace(plan=refused), SimpleNamespace(plan=good)]
    assert _first_supported(net, spec, top).plan is good
    with pytest.raises(PlanError, match=r"none of the search's 1 best plans.*ties its input and output embeddings"):
        _first_supported(net, spec, top[:1])


def test_a_model_described_by_structure_only_is_not_searched() -> None:
    """A model whose forward cannot run on the meta device gets a structural description (no FLOPs,
    no activations); ``wrap(plan="auto")``'s search refuses it with the reason instead of costing every
    plan at nothing (and picking one that would not fit)."""
    from torch import nn

    from galvatron.errors import GalvatronError

    class ValueDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x) * float(x.abs().max())  # a value: none on the meta device
            return x

    spec = describe(ValueDependent(), torch.zeros(2, 8, dtype=torch.long))
    assert not any(layer.flops_per_token for layer in spec.blocks)
    with pytest.raises(GalvatronError, match="cannot search a plan for ValueDependent: structure only"):
        search_plan(spec, WORLD)
