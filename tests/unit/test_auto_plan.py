"""``wrap(plan="auto")``'s search (``runtime.apply.search_plan``) returns a plan the runtime runs for
the model, also where the search's fastest is one it refuses."""

from __future__ import annotations

import pytest
import torch
from galvatron.launch.launcher import native_cost_options
from galvatron.strategies.cost.model import as_perf
from galvatron.strategies.search import search
from galvatron.strategies.search.brute import with_memory

from galvatron.errors import PlanError
from galvatron.models.gpt import GPT, GPTConfig
from galvatron.runtime.apply import auto_searches, check_supported, describe, local_cluster, search_plan

WORLD = 4


def _tied() -> tuple[GPT, torch.Tensor]:
    torch.manual_seed(0)
    net = GPT(GPTConfig(layers=4, hidden=32, heads=4, vocab=64, seq_len=8, ffn_hidden=64, tied_embeddings=True,
                        position="learned"))
    return net, torch.randint(0, 64, (8, 8))


@pytest.mark.parametrize("memory", [0.9, 0.6])
def test_auto_skips_plans_the_runtime_refuses(memory: float) -> None:
    """Tied embeddings need the first and last pipeline stages laid out alike, which the search does
    not see: under these memory limits its fastest plan for a tied GPT on 4 CPU workers is refused;
    ``search_plan`` takes the fastest one the runtime accepts."""
    net, batch = _tied()
    spec = describe(net, batch)
    cluster = local_cluster(WORLD)
    runnable, _ = auto_searches(batch.shape[0], gpu=False)
    unlimited = search(spec, cluster, runnable, native_cost_options(cluster), world_size=WORLD).best
    perf = with_memory(as_perf(cluster), memory * unlimited.peak_memory_gib)
    fastest = search(spec, perf, runnable, native_cost_options(cluster), world_size=WORLD).best
    with pytest.raises(PlanError, match="tied embeddings"):
        check_supported(net, fastest.plan, spec, None)
    chosen = search_plan(spec, WORLD, batch, model=net, perf=perf)
    check_supported(net, chosen, spec, None)
    assert chosen.world_size == WORLD
