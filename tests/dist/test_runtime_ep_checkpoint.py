"""Checkpoints of expert-parallel models on 2 and 4 gloo ranks: the reference MoE GPT and a tiny
Mixtral saved under one plan (DCP folder or one full file, model and optimizer) load under
another (other ep, expert TP, no EP; dense to EP), bit-equal to what was saved, and the next step
agrees with the model that went on training; what was saved equals single-process training; a
single process loads both formats into the plain model; a folder missing one rank's experts is
refused."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from galvatron.plan import Plan
from galvatron.testing import run_ranks

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_runtime_harness as harness
from test_runtime_ep import _ep_plan
from test_runtime_harness import MODELS, batches, checkpoint_path, loss_fn, plan_dict, wrapped_step

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Move:
    """Train ``model`` one step under ``src``, save, load under ``dst`` (None: the plain model saved
    by the parent, loaded under ``src``), train one more step on both."""

    name: str
    model: str
    src: Plan
    dst: Plan | None
    full: bool = False
    adam: bool = False


def _dense(world: int, **strategy: Any) -> Plan:
    return plan_dict(world, [{"range": [0, harness.LAYERS], **strategy}])


MOVES = {
    2: [
        Move("gpt-moe-ep2-to-dp2", "gpt-moe", _ep_plan(2, "gpt-moe", 2), _dense(2)),
        Move("mixtral-ep2-to-tp2", "mixtral", _ep_plan(2, "mixtral", 2), _dense(2, tp=2), adam=True),
        Move("gpt-moe-zero2-to-ep2-zero3", "gpt-moe", _dense(2, zero=2), _ep_plan(2, "gpt-moe", 2, zero=3),
             adam=True),
        Move("gpt-moe-ep2-full-to-zero3", "gpt-moe", _ep_plan(2, "gpt-moe", 2), _dense(2, zero=3), full=True),
        Move("mixtral-ep2-zero1-to-itself", "mixtral", _ep_plan(2, "mixtral", 2, zero=1),
             _ep_plan(2, "mixtral", 2, zero=1), adam=True),
        Move("plain-to-gpt-moe-ep2", "gpt-moe", _ep_plan(2, "gpt-moe", 2), None),
        Move("plain-full-to-mixtral-ep2", "mixtral", _ep_plan(2, "mixtral", 2), None, full=True, adam=True),
    ],
    4: [
        Move("gpt-moe-dp4-ep2-to-ep4", "gpt-moe", _ep_plan(4, "gpt-moe", 2), _ep_plan(4, "gpt-moe", 4)),
        Move("mixtral-tp2-ep2-to-ep4", "mixtral", _ep_plan(4, "mixtral", 2, tp=2), _ep_plan(4, "mixtral", 4),
             adam=True),
        Move("gpt-moe-ep4-to-tp2-ep2-zero3", "gpt-moe", _ep_plan(4, "gpt-moe", 4),
             _ep_plan(4, "gpt-moe", 2, tp=2, zero=3), adam=True),
        Move("gpt-moe-tp2-sp-ep2-full-to-ep4", "gpt-moe", _ep_plan(4, "gpt-moe", 2, tp=2, sp=True),
             _ep_plan(4, "gpt-moe", 4), full=True),
        Move("mixtral-ep4-full-to-tp2-ep2", "mixtral", _ep_plan(4, "mixtral", 4), _ep_plan(4, "mixtral", 2, tp=2),
             full=True, adam=True),
        Move("mixtral-tp2-ep2-to-dp2-tp2", "mixtral", _ep_plan(4, "mixtral", 2, tp=2), _dense(4, tp=2)),
        # MoE Parallel Folding (expert TP 1 under attention TP 2): EP over TP ranks
        Move("gpt-moe-tp2-sp-ep2-etp1-to-ep4", "gpt-moe", _ep_plan(4, "gpt-moe", 2, etp=1, tp=2, sp=True),
             _ep_plan(4, "gpt-moe", 4), adam=True),
        Move("mixtral-tp2-sp-ep4-etp1-to-tp2-ep2", "mixtral", _ep_plan(4, "mixtral", 4, etp=1, tp=2, sp=True),
             _ep_plan(4, "mixtral", 2, tp=2)),
        Move("mixtral-ep4-full-to-tp2-sp-ep2-etp1", "mixtral", _ep_plan(4, "mixtral", 4),
             _ep_plan(4, "mixtral", 2, etp=1, tp=2, sp=True, zero=3), full=True, adam=True),
    ],
}
SABOTAGE = [Move(f"{m}-ep2-rank1-experts-dropped", m, _ep_plan(2, m, 2), _dense(2)) for m in ("gpt-moe", "mixtral")]


def _wrapped(plan: Plan, move: Move) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    import galvatron

    model = galvatron.wrap(MODELS[move.model](), plan)
    cls, kwargs = _optimizer(move)
    return model, model.optimizer(cls, **kwargs)


def _optimizer(move: Move) -> tuple[Any, ...]:
    if move.adam:
        return torch.optim.AdamW, {"lr": 1e-2, "eps": harness.ADAM_EPS}
    return torch.optim.SGD, {"lr": harness.LR, "momentum": harness.MOMENTUM}


def _move(move: Move, root: str) -> dict[str, Any]:
    from galvatron.runtime import checkpoint

    path = checkpoint_path(root, move)
    if move.dst is None:  # the parent saved the plain model after one step
        other, other_opt = _wrapped(move.src, move)
        checkpoint.load(other, path, other_opt)
        loaded = checkpoint.full_state_dict(other)
        return {"loaded": loaded, "loss": wrapped_step(other, other_opt, 1),
                "continued": checkpoint.full_state_dict(other)}
    model, opt = _wrapped(move.src, move)
    wrapped_step(model, opt, 0)
    checkpoint.save(model, path, opt, full=move.full)
    saved = checkpoint.full_state_dict(model)
    loss = wrapped_step(model, opt, 1)
    expected = checkpoint.full_state_dict(model)
    other, other_opt = _wrapped(move.dst, move)
    checkpoint.load(other, path, other_opt)
    loaded = checkpoint.full_state_dict(other)
    return {"saved": saved, "loaded": loaded, "expected": expected, "expected_loss": loss,
            "loss": wrapped_step(other, other_opt, 1), "continued": checkpoint.full_state_dict(other)}


def _sabotaged(move: Move, root: str) -> str:
    """Save with rank 1's experts left out: saving or loading must fail."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException

    from galvatron.errors import GalvatronError
    from galvatron.runtime import checkpoint

    model, _ = _wrapped(move.src, move)
    keep = checkpoint._sharded_experts

    def drop(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        state = keep(model, state)
        if dist.get_rank() == 1:
            state = {"model": {k: v for k, v in state["model"].items() if ".experts." not in k}}
        return state

    checkpoint._sharded_experts = drop
    try:
        checkpoint.save(model, checkpoint_path(root, move))
    except CheckpointException as err:
        return f"save: {err}"
    finally:
        checkpoint._sharded_experts = keep
    try:
        checkpoint.load(_wrapped(move.dst, move)[0], checkpoint_path(root, move))
    except GalvatronError as err:
        return f"load: {err}"
    return "loaded"


def _rank_main(moves: list[Move], root: str) -> dict[str, Any]:
    out: dict[str, Any] = {move.name: _move(move, root) for move in moves}
    if len(moves) == len(MOVES[2]):
        out.update({move.name: _sabotaged(move, root) for move in SABOTAGE})
    return out


def _plain(move: Move, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[float]]:
    """Single-process training of ``move``'s model for ``steps`` steps."""
    model = MODELS[move.model]()
    cls, kwargs = _optimizer(move)
    opt = cls(model.parameters(), **kwargs)
    losses = []
    for tokens, targets in batches()[:steps]:
        loss = loss_fn(model(tokens), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, opt, losses


def _save_plain(root: Path) -> None:
    """The plain models after one step, for the moves that start from one (a single process)."""
    from galvatron.runtime import checkpoint

    for move in MOVES[2]:
        if move.dst is None:
            model, opt, _ = _plain(move, 1)
            if move.full:
                torch.save({"model": model.state_dict(), "optimizer": _full_optim(model, opt)},
                           checkpoint_path(root, move))
            else:
                checkpoint.save(model, checkpoint_path(root, move), opt)


def _full_optim(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))


_RESULTS: dict[int, tuple[Path, list[dict[str, Any]]]] = {}


def results(world: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    if world not in _RESULTS:
        root = tmp_path_factory.mktemp(f"ep-checkpoints-{world}")
        if world == 2:
            _save_plain(root)
        _RESULTS[world] = root, run_ranks(_rank_main, world, MOVES[world], str(root), timeout=600)
    return _RESULTS[world]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0 if atol == 0 else 1e-4, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _tolerance(move: Move) -> float:
    return 1e-5 if move.adam else 1e-6


@pytest.mark.parametrize("world,move", [(w, m) for w, ms in MOVES.items() for m in ms],
                         ids=[f"{w}ranks-{m.name}" for w, ms in MOVES.items() for m in ms])
def test_an_expert_parallel_checkpoint_loads_under_another_plan(world: int, move: Move,
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    _, ranks = results(world, tmp_path_factory)
    plain, _, ref_losses = _plain(move, 2)
    one_step = dict(_plain(move, 1)[0].state_dict())
    for per_rank in ranks:
        got = per_rank[move.name]
        if move.dst is None:
            _same(got["loaded"], one_step)
        else:
            _same(got["saved"], one_step, atol=_tolerance(move))  # the experts of every rank, in place
            _same(got["saved"], got["loaded"])  # restored bit-exactly
            _same(got["expected"], got["continued"], atol=_tolerance(move))  # the optimizer state too
            assert got["loss"] == pytest.approx(got["expected_loss"], rel=1e-6)
        assert got["loss"] == pytest.approx(ref_losses[1], rel=1e-5)
        _same(got["continued"], dict(plain.state_dict()), atol=_tolerance(move))


@pytest.mark.parametrize("world,move", [(w, m) for w, ms in MOVES.items() for m in ms if m.dst is not None],
                         ids=[f"{w}ranks-{m.name}" for w, ms in MOVES.items() for m in ms if m.dst is not None])
def test_a_single_process_loads_an_expert_parallel_checkpoint(world: int, move: Move,
                                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    from galvatron.runtime import checkpoint

    root, ranks = results(world, tmp_path_factory)
    plain = MODELS[move.model]()
    if move.full:
        plain.load_state_dict(torch.load(checkpoint_path(root, move), weights_only=False)["model"])
    else:
        checkpoint.load(plain, checkpoint_path(root, move))
    _same(dict(plain.state_dict()), ranks[0][move.name]["saved"])


@pytest.mark.parametrize("move,error", list(zip(SABOTAGE, [
    ("load: ", "lacks 8 entries of this model, e.g. blocks.0.mlp.experts.2"),
    ("save: ", "experts.gate_up_proj invalid fill tensor-volume: 12288 chunks-volume: 6144")], strict=True)),
                         ids=[m.model for m in SABOTAGE])
def test_a_checkpoint_missing_one_ranks_experts_is_refused(move: Move, error: tuple[str, str],
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """ModuleList experts: their entries are missing (load refuses); fused experts: half of each
    tensor (DCP's save refuses)."""
    _, ranks = results(2, tmp_path_factory)
    for per_rank in ranks:
        assert per_rank[move.name].startswith(error[0]) and error[1] in per_rank[move.name], per_rank[move.name]
