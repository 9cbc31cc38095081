"""``plan="auto"``: the example trains the reference GPT on 4 CPU processes under torchrun with
the plan the search picks, which rank 0 names with its prediction; a plan file named by
``$GALVATRON_PLAN`` wins over the search; a search that fails on rank 0 fails every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from galvatron.errors import GalvatronError
from galvatron.testing import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runtime_harness import MODELS, uniform

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_the_example_trains_under_torchrun_with_the_searched_plan() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GALVATRON_PLAN", None)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         str(ROOT / "examples" / "train_gpt.py"), "--steps", "15", "--seq", "32", "--hidden", "64"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "plan: " in run.stdout and "4 devices" in run.stdout
    assert ": decreasing" in run.stdout
    # rank 0 alone says which plan the search picked and what it predicts
    assert run.stderr.count("galvatron: plan='auto' picked (predicted step ") == 1, run.stderr[-4000:]


def _auto(plan_file: str) -> dict[str, Any]:
    from galvatron.strategies.search import SearchOptions

    import galvatron

    os.environ["GALVATRON_PLAN"] = plan_file
    model = galvatron.wrap(MODELS["gpt"]())
    out: dict[str, Any] = {"from_file": model.plan.to_dict()}
    del os.environ["GALVATRON_PLAN"]
    try:
        galvatron.wrap(MODELS["gpt"](), "auto", search_options=SearchOptions(global_batch=8, fixed={"tp": 3}))
        out["failed"] = "no error"
    except GalvatronError as err:
        out["failed"] = f"{type(err).__name__}: {err}"
    return out


def test_a_plan_file_wins_and_a_failed_search_fails_every_rank(tmp_path: Path) -> None:
    plan = uniform(2, tp=2, zero=1)
    plan.save(tmp_path / "plan.yaml")
    ranks = run_ranks(_auto, 2, str(tmp_path / "plan.yaml"), timeout=120)
    assert all(result["from_file"] == plan.to_dict() for result in ranks)
    assert ranks[0]["failed"].startswith("MemoryBudgetError: GPT: no plan in the search space")
    assert ranks[1]["failed"].startswith("GalvatronError: plan='auto': the search on rank 0 failed: MemoryBudgetError")


# ------------------------------------------------------------------ plan="auto" with expert parallelism
MOE = dict(vocab=256, seq_len=64, layers=4, hidden=64, heads=4, experts=8, top_k=2, expert_ffn_hidden=256)


def _moe_model() -> Any:
    import torch

    from galvatron.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(**MOE))


def _moe_batches() -> list[tuple[Any, Any]]:
    import torch

    g = torch.Generator().manual_seed(3)
    return [tuple(torch.randint(0, MOE["vocab"], (8, MOE["seq_len"]), generator=g) for _ in range(2))
            for _ in range(3)]


def _moe_train(wrapped: bool) -> dict[str, Any]:
    import torch
    from test_runtime_harness import loss_fn

    import galvatron

    if wrapped:  # on the forked ranks: the nominal CPU model, whose choice does not vary run to run
        os.environ["GALVATRON_PROFILE"] = "0"
    data = _moe_batches()
    net = _moe_model()
    model = galvatron.wrap(net, "auto", example_batch=data[0][0]) if wrapped else net
    opt = (model.optimizer if wrapped else lambda cls, **kw: cls(net.parameters(), **kw))(torch.optim.SGD, lr=0.1)
    losses = []
    for tokens, targets in data:
        if wrapped:
            loss = model.train_step(model.shard_batch((tokens, targets)), loss_fn)
        else:
            loss = loss_fn(net(tokens), targets)
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "plan": model.plan.to_dict() if wrapped else None}


def test_auto_offers_expert_parallelism_and_trains_like_one_process() -> None:
    """On 4 CPU ranks, costed on the nominal CPU, the search prefers EP for this MoE GPT (a one-stage
    uniform plan, which the native runtime runs); the run's losses equal one process's over 3 SGD steps."""
    import torch

    from galvatron.plan import Plan

    reference = _moe_train(False)["losses"]
    ranks = run_ranks(_moe_train, 4, True, timeout=300)
    plan = Plan.from_dict(ranks[0]["plan"])
    assert all(r["plan"] == ranks[0]["plan"] for r in ranks)
    assert plan.pp == 1 and max(g.strategy.ep for g in plan.groups()) > 1, plan.describe()
    for r in ranks:
        assert torch.allclose(torch.tensor(r["losses"]), torch.tensor(reference), rtol=1e-5, atol=1e-6), (
            r["losses"], reference)
