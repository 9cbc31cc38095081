"""Pipeline parallelism on forked gloo ranks, compared number for number with single-process training.

Every case trains a tiny model (reference GPT with tied embeddings, Hugging Face GPT-2 (tied),
Llama, Mixtral) for three AdamW steps under one schedule and one stage split (the "edges" splits put
the embedding, and the norm and head, on stages without blocks); the loss of every
step and every parameter afterwards must match the single-process run on the whole batch. Cases
with ``dp = 2`` put two ranks on each stage (rank r of stage k feeds rank r of stage k+1), each on
half the batch, with a plain gradient all-reduce over the stage's ranks; on 2 ranks that leaves a
pipeline of one device group (with two virtual stages: tied embeddings on one rank). All cases of one world
size share one launch; the references are computed once per model in the parent.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from galvatron.errors import PlanError
from galvatron.plan import Plan
from galvatron.runtime.pipeline import PipelineRunner, split_stages
from galvatron.testing import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_pipeline_split import MODELS, SEQ, VOCAB  # the model fixtures live with the unit tests

pytestmark = pytest.mark.slow

BATCH, MICRO_BATCHES, STEPS, LR, EPS = 8, 4, 3, 1e-2, 1e-6
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zero-bubble", 1), ("zero-bubble", 2))
SPLITS = {  # (world, dp, virtual stages) -> {name: layer counts per stage}
    (2, 1, 1): {"even": (4, 4), "uneven": (5, 3)},
    (2, 1, 2): {"even": (2, 2, 2, 2), "uneven": (3, 1, 1, 3), "edges": (0, 4, 4, 0)},
    (2, 2, 1): {"whole": (8,)},
    (2, 2, 2): {"uneven": (3, 5)},
    (4, 1, 1): {"even": (3, 3, 3, 3), "uneven": (5, 1, 2, 4), "edges": (0, 6, 6, 0)},
    (4, 1, 2): {"even": (2, 2, 2, 2, 1, 1, 1, 1), "uneven": (1, 3, 1, 1, 2, 1, 2, 1)},
    (4, 2, 1): {"uneven": (8, 4)},
    (4, 2, 2): {"uneven": (4, 2, 1, 5)},
}
LAYERS = {2: 8, 4: 12}


@dataclass(frozen=True)
class Case:
    model: str
    schedule: str
    virtual: int
    split: str
    dp: int = 1

    def layer_split(self, world: int) -> tuple[int, ...]:
        return SPLITS[world, self.dp, self.virtual][self.split]

    def plan(self, world: int) -> Plan:
        split = self.layer_split(world)
        return Plan.uniform(sum(split), global_batch_size=BATCH, num_micro_batches=MICRO_BATCHES,
                            pp=len(split) // self.virtual, virtual_stages=self.virtual, schedule=self.schedule,
                            layer_split=split, dp=self.dp).validate(world)

    @property
    def name(self) -> str:
        dp = f"-dp{self.dp}" if self.dp > 1 else ""
        return f"{self.model}-{self.schedule}-v{self.virtual}-{self.split}{dp}"


def _matrix(world: int) -> list[Case]:
    return [Case(m, s, v, split) for m in ("gpt", "gpt2", "llama") for s, v in SCHEDULES
            for split in SPLITS[world, 1, v]]


CASES = {
    2: [*_matrix(2), Case("mixtral", "1f1b", 1, "uneven"), Case("mixtral", "zero-bubble", 2, "uneven"),
        Case("gpt2", "gpipe", 1, "whole", dp=2), Case("gpt", "zero-bubble", 2, "uneven", dp=2)],  # pp = 1
    4: [*_matrix(4), *(Case(m, s, v, "uneven", dp=2) for m in ("gpt", "gpt2", "llama")
                       for s, v in (("1f1b", 1), ("interleaved-1f1b", 2), ("zero-bubble", 2)))],
}


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    tokens, targets = torch.randint(0, VOCAB, (2, BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    return tokens, targets


def _batch(model: str, tokens: torch.Tensor) -> Any:
    """The reference GPT takes its tokens positionally; the Hugging Face models as ``input_ids=``."""
    return tokens if MODELS[model].input_name == "tokens" else {MODELS[model].input_name: tokens}


def _reference(model: str, layers: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    net = MODELS[model].build(layers)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, eps=EPS)
    tokens, targets = _data()
    losses = []
    for _ in range(STEPS):
        batch = _batch(model, tokens)
        out = net(**batch) if isinstance(batch, dict) else net(batch)
        loss = loss_fn(out if isinstance(out, torch.Tensor) else out.logits, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in net.named_parameters(remove_duplicate=False)}


# ---------------------------------------------------------------------------------------- ranks
@dataclass
class _Layout:
    stage: int
    """This rank's pipeline device group."""
    replica: int
    """This rank's data-parallel index inside its stage."""
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup | None


def _layouts(world: int, dps: list[int]) -> dict[int, _Layout]:
    """Stage k holds ranks k*dp .. k*dp+dp-1; every rank creates every group, in one order."""
    rank, out = dist.get_rank(), {}
    for dp in dps:
        pp = world // dp
        pp_groups = [dist.new_group([r + k * dp for k in range(pp)]) for r in range(dp)]
        dp_groups = [dist.new_group(list(range(k * dp, (k + 1) * dp))) for k in range(pp)] if dp > 1 else None
        stage, replica = divmod(rank, dp)
        out[dp] = _Layout(stage, replica, pp_groups[replica], dp_groups[stage] if dp_groups else None)
    return out


def _train(case: Case, world: int, layout: _Layout) -> tuple[list[float], dict[str, torch.Tensor]]:
    spec, plan = MODELS[case.model], case.plan(world)
    chunks = split_stages(spec.build(plan.num_layers), spec.block_path, plan, layout.stage)
    runner = PipelineRunner(chunks, plan, layout.pp_group, loss_fn, "cpu")
    opt = torch.optim.AdamW(runner.parameters(), lr=LR, eps=EPS)
    tokens, targets = (t.chunk(case.dp)[layout.replica] for t in _data())
    losses = []
    for _ in range(STEPS):
        loss = runner.step(_batch(case.model, tokens), targets)
        if layout.dp_group is not None:
            for t in [loss, *(p.grad for p in runner.parameters())]:
                dist.all_reduce(t, group=layout.dp_group)
                t /= case.dp
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    named = (item for chunk in chunks for item in chunk.named_parameters(remove_duplicate=False))
    return losses, {n: p.detach().clone() for n, p in named}


def _misuse(world: int) -> list[str]:
    """Errors a caller gets for a plan of another pipeline size and for an indivisible batch."""
    spec, messages = MODELS["gpt"], []
    wrong = Plan.uniform(8, global_batch_size=BATCH, num_micro_batches=4, pp=2 * world)
    try:
        PipelineRunner(split_stages(spec.build(8), "blocks", wrong, dist.get_rank()), wrong, dist.group.WORLD,
                       loss_fn, "cpu")
    except PlanError as err:
        messages.append(str(err))
    plan = Plan.uniform(8, global_batch_size=BATCH, num_micro_batches=4, pp=world)
    runner = PipelineRunner(split_stages(spec.build(8), "blocks", plan, dist.get_rank()), plan, dist.group.WORLD,
                            loss_fn, "cpu")
    try:
        runner.step(torch.zeros(6, SEQ, dtype=torch.long), torch.zeros(6, SEQ, dtype=torch.long))
    except ValueError as err:
        messages.append(str(err))
    return messages


def _rank_main(world: int, cases: list[Case]) -> dict[str, Any]:
    layouts = _layouts(world, sorted({c.dp for c in cases}))
    results: dict[str, Any] = {c.name: _train(c, world, layouts[c.dp]) for c in cases}
    results["misuse"] = _misuse(world)
    return results


# ---------------------------------------------------------------------------------------- tests
_RESULTS: dict[int, tuple[dict[tuple[str, int], Any], list[dict[str, Any]]]] = {}


def _results(world: int) -> tuple[dict[tuple[str, int], Any], list[dict[str, Any]]]:
    """(references by (model, layers), per-rank results): one launch per world size. The launch comes
    first: a CUDA build of torch cannot run autograd in ranks forked after the parent has."""
    if world not in _RESULTS:
        ranks = run_ranks(_rank_main, world, world, CASES[world], timeout=600)
        refs = {(m, LAYERS[world]): _reference(m, LAYERS[world]) for m in sorted({c.model for c in CASES[world]})}
        _RESULTS[world] = refs, ranks
    return _RESULTS[world]


@pytest.mark.parametrize("world,case", [(w, c) for w, cases in CASES.items() for c in cases],
                         ids=[f"{w}ranks-{c.name}" for w, cases in CASES.items() for c in cases])
def test_pipeline_matches_single_process(world: int, case: Case) -> None:
    refs, ranks = _results(world)
    ref_losses, ref_params = refs[case.model, LAYERS[world]]
    held: dict[str, int] = {}
    for rank, result in enumerate(ranks):
        losses, params = result[case.name]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5,
                                   msg=lambda m, rank=rank: f"rank {rank} losses: {m}")
        for name, value in params.items():
            held[name] = held.get(name, 0) + 1
            torch.testing.assert_close(value, ref_params[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
    assert held == dict.fromkeys(ref_params, case.dp)  # every parameter on exactly one stage's ranks


@pytest.mark.parametrize("world", CASES)
def test_misuse_fails_clearly_on_every_rank(world: int) -> None:
    _, ranks = _results(world)
    for messages in (r["misuse"] for r in ranks):
        assert len(messages) == 2
        assert f"the plan has {2 * world} pipeline device groups, pp_group has {world} ranks" in messages[0]
        assert "batch size 6, not a multiple of the 4 micro-batches" in messages[1]
