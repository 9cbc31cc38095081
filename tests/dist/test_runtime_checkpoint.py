"""Checkpoints of wrapped models on 2 gloo ranks: a sharded checkpoint saved under one plan loads
under another (model and optimizer resharded) and training continues exactly as it would have;
a full checkpoint loads into a plain single-process model; ZeRO-1 optimizer state reloads
under its own plan from either format (other plans: test_runtime_zero1_checkpoint)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from galvatron.plan import Plan
from galvatron.testing import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runtime_harness import MODELS, batches, loss_fn, plan_dict, uniform

pytestmark = pytest.mark.slow

PLANS = {
    "dp": uniform(2),
    "zero3": uniform(2, zero=3),
    "tp-sp-zero2": uniform(2, tp=2, sp=True, zero=2),
    "mixed": plan_dict(2, [{"range": [0, 2], "tp": 2, "sp": True}, {"range": [2, 4], "zero": 3}],
                       embedding={"tp": 2}, head={"tp": 2}),
    # an interleaved pipeline whose first and last chunks hold the embedding, and the norm and head, alone
    "pipeline-edges": Plan.uniform(4, global_batch_size=8, num_micro_batches=4, pp=2, virtual_stages=2,
                                   schedule="interleaved-1f1b", layer_split=[0, 2, 2, 0], dtype="fp32"),
}
MOVES = [("zero3", "tp-sp-zero2"), ("tp-sp-zero2", "mixed"), ("mixed", "dp"), ("pipeline-edges", "dp")]


def _wrapped(plan: Plan) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    import galvatron

    model = galvatron.wrap(MODELS["gpt"](), plan)
    return model, model.optimizer(torch.optim.AdamW, lr=1e-2)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    model.train_step(model.shard_batch(batches()[step]), loss_fn)
    opt.step()
    opt.zero_grad()


def _rank_main(root: str) -> dict[str, Any]:
    from galvatron.runtime import checkpoint

    out: dict[str, Any] = {}
    for src, dst in MOVES:
        path = Path(root) / f"{src}-to-{dst}"
        model, opt = _wrapped(PLANS[src])
        _step(model, opt, 0)
        checkpoint.save(model, path, opt)
        saved = checkpoint.full_state_dict(model)
        _step(model, opt, 1)
        expected = checkpoint.full_state_dict(model)
        other, other_opt = _wrapped(PLANS[dst])
        checkpoint.load(other, path, other_opt)
        loaded = checkpoint.full_state_dict(other)
        _step(other, other_opt, 1)
        out[f"{src}-to-{dst}"] = (saved, loaded, expected, checkpoint.full_state_dict(other))
    model, opt = _wrapped(PLANS["mixed"])
    _step(model, opt, 0)
    checkpoint.save(model, Path(root) / "full.pt", full=True)
    out["full"] = checkpoint.full_state_dict(model)
    zero1, zero1_opt = _wrapped(uniform(2, zero=1))
    _step(zero1, zero1_opt, 0)
    checkpoint.save(zero1, Path(root) / "zero1", zero1_opt)
    checkpoint.save(zero1, Path(root) / "zero1.pt", zero1_opt, full=True)
    _step(zero1, zero1_opt, 1)
    for name in ("zero1", "zero1.pt"):
        again, again_opt = _wrapped(uniform(2, zero=1))
        checkpoint.load(again, Path(root) / name, again_opt)
        _step(again, again_opt, 1)
        out[name] = (checkpoint.full_state_dict(zero1), checkpoint.full_state_dict(again))
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("checkpoints")
    results = run_ranks(_rank_main, 2, str(root), timeout=600)
    results[0]["root"] = root
    return results


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("move", [f"{s}-to-{d}" for s, d in MOVES])
def test_a_sharded_checkpoint_loads_under_another_plan(ranks: list[dict[str, Any]], move: str) -> None:
    for result in ranks:
        saved, loaded, expected, continued = result[move]
        _assert_same(saved, loaded)  # the model is restored exactly
        _assert_same(expected, continued, atol=1e-5)  # and so is the optimizer: the next step agrees


def test_a_full_checkpoint_loads_into_a_plain_model(ranks: list[dict[str, Any]]) -> None:
    state = torch.load(ranks[0]["root"] / "full.pt", weights_only=False)["model"]
    plain = MODELS["gpt"]()
    plain.load_state_dict(state)
    _assert_same(dict(plain.state_dict()), ranks[0]["full"])


def test_zero1_optimizer_state_reloads_under_its_plan(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        _assert_same(*result["zero1"], atol=1e-6)
        _assert_same(*result["zero1.pt"], atol=1e-6)
