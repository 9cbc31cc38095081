"""ZeRO-1 optimizer state moves between plans on 2 and 4 gloo ranks: a model trained one step under
ZeRO-1 and saved (DCP folder or one full file) loads under another plan (other dp degree and world
size, ZeRO-3, plain DDP, TP, expert parallelism, one process; and dense into ZeRO-1), model and
optimizer state bit-equal to what was saved; the next two steps' losses and every parameter equal
the uninterrupted run and single-process training; the saved state equals single-process AdamW's;
a save that lacks one rank's slice of the state is refused."""

from __future__ import annotations

import copy
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
from test_runtime_harness import MODELS, batches, checkpoint_path, loss_fn, uniform, wrapped_step

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Move:
    """Train ``model`` one step under ``src``, save, load under ``dst``, train two more steps on both.
    ``src`` None: load the checkpoint of the 4-rank move ``saved_by`` instead."""

    name: str
    model: str
    src: Plan | None
    dst: Plan
    full: bool = False
    sgd: bool = False
    saved_by: str | None = None


MOVES = {
    4: [
        Move("gpt-dp4-zero1-to-tp2-dp2-zero1", "gpt", uniform(4, zero=1), uniform(4, tp=2, zero=1)),
        Move("gpt-dp4-zero1-full-to-zero3", "gpt", uniform(4, zero=1), uniform(4, zero=3), full=True),
        Move("gpt-tp2-sp-zero1-to-dp4-ddp", "gpt", uniform(4, tp=2, sp=True, zero=1), uniform(4)),
        Move("mixtral-ep2-zero1-to-ep4-zero1", "mixtral", _ep_plan(4, "mixtral", 2, zero=1),
             _ep_plan(4, "mixtral", 4, zero=1)),
        Move("gpt-moe-ep2-zero1-full-to-dp4-zero1", "gpt-moe", _ep_plan(4, "gpt-moe", 2, zero=1), uniform(4, zero=1),
             full=True),
    ],
    2: [
        Move("gpt-dp4-zero1-to-dp2-zero1", "gpt", None, uniform(2, zero=1), saved_by="gpt-dp4-zero1-to-tp2-dp2-zero1"),
        Move("gpt-dp4-zero1-full-to-dp2-ddp", "gpt", None, uniform(2), full=True,
             saved_by="gpt-dp4-zero1-full-to-zero3"),
        Move("gpt-dp2-zero1-sgd-to-tp2", "gpt", uniform(2, zero=1), uniform(2, tp=2), sgd=True),
        Move("gpt-zero3-to-dp2-zero1", "gpt", uniform(2, zero=3), uniform(2, zero=1)),
        Move("gpt-dp2-zero1-full-to-dp2-zero1", "gpt", uniform(2, zero=1), uniform(2, zero=1), full=True),
        Move("mixtral-ep2-zero1-to-tp2", "mixtral", _ep_plan(2, "mixtral", 2, zero=1), uniform(2, tp=2)),
    ],
}
BY_NAME = {m.name: m for ms in MOVES.values() for m in ms}
ONE_PROCESS = [BY_NAME["gpt-dp4-zero1-to-tp2-dp2-zero1"], BY_NAME["gpt-dp4-zero1-full-to-zero3"]]


def _optimizer(move: Move) -> tuple[Any, dict[str, Any]]:
    if move.sgd:
        return torch.optim.SGD, {"lr": harness.LR, "momentum": harness.MOMENTUM}
    return torch.optim.AdamW, {"lr": 1e-2, "eps": harness.ADAM_EPS}


def _wrapped(plan: Plan, move: Move) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    import galvatron

    model = galvatron.wrap(MODELS[move.model](), plan)
    cls, kwargs = _optimizer(move)
    return model, model.optimizer(cls, **kwargs)


def _states(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    from galvatron.runtime import checkpoint

    return checkpoint.full_state_dict(model), checkpoint.full_optimizer_state_dict(model, opt)


def _move(move: Move, root: str) -> dict[str, Any]:
    from galvatron.runtime import checkpoint

    out: dict[str, Any] = {}
    path = checkpoint_path(root, BY_NAME[move.saved_by] if move.saved_by else move)
    if move.src is not None:
        model, opt = _wrapped(move.src, move)
        wrapped_step(model, opt, 0)
        assert opt.state, "the optimizer holds state after a step"
        checkpoint.save(model, path, opt, full=move.full)
        out["saved"] = _states(model, opt)
        out["expected_losses"] = [wrapped_step(model, opt, step) for step in (1, 2)]
        out["expected"] = checkpoint.full_state_dict(model)
    other, other_opt = _wrapped(move.dst, move)
    checkpoint.load(other, path, other_opt)
    out["loaded"] = _states(other, other_opt)
    out["losses"] = [wrapped_step(other, other_opt, step) for step in (1, 2)]
    out["continued"] = checkpoint.full_state_dict(other)
    return out


def _sabotaged(root: str) -> str:
    """Save a ZeRO-1 optimizer whose rank 1 lost its slices of the state: the save must refuse."""
    import torch.distributed as dist

    from galvatron.errors import GalvatronError
    from galvatron.runtime import checkpoint

    move = Move("gpt-dp2-zero1-rank1-state-dropped", "gpt", uniform(2, zero=1), uniform(2))
    model, opt = _wrapped(move.src, move)
    wrapped_step(model, opt, 0)
    if dist.get_rank() == 1:
        for shard in opt._galvatron_shards:
            for piece in shard.pieces:
                opt.state.pop(piece.shard, None)
    try:
        checkpoint.save(model, checkpoint_path(root, move), opt)
    except GalvatronError as err:
        return str(err)
    return "saved"


def _rank_main(moves: list[Move], root: str, sabotage: bool) -> dict[str, Any]:
    out: dict[str, Any] = {move.name: _move(move, root) for move in moves}
    if sabotage:
        out["sabotage"] = _sabotaged(root)
    return out


def _plain(move: Move, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[float]]:
    """Single-process training of ``move``'s model for ``steps`` steps."""
    model = MODELS[move.model]()
    cls, kwargs = _optimizer(move)
    opt = cls(model.parameters(), **kwargs)
    losses = [_plain_step(model, opt, step) for step in range(steps)]
    return model, opt, losses


def _plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    tokens, targets = batches()[step]
    loss = loss_fn(model(tokens), targets)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def _plain_optim_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))


_RESULTS: dict[int, tuple[Path, list[dict[str, Any]]]] = {}


def results(world: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Run each world size's moves once (4 first: the 2-rank launch loads its checkpoints)."""
    if not _RESULTS:
        root = tmp_path_factory.mktemp("zero1-checkpoints")
        for w in (4, 2):
            _RESULTS[w] = root, run_ranks(_rank_main, w, MOVES[w], str(root), w == 2, timeout=900)
    return _RESULTS[world]


def _same(a: dict[str, Any], b: dict[str, Any], atol: float = 0.0) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0 if atol == 0 else 1e-4, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _same_optim(a: dict[str, Any], b: dict[str, Any], atol: float = 0.0) -> None:
    assert set(a["state"]) == set(b["state"]), set(a["state"]) ^ set(b["state"])
    for name, entry in b["state"].items():
        _same({f"{name}.{k}": v for k, v in a["state"][name].items()}, {f"{name}.{k}": v for k, v in entry.items()},
              atol)
    assert [g["lr"] for g in a["param_groups"]] == [g["lr"] for g in b["param_groups"]]


ATOL = 1e-5  # Adam amplifies reduction-order noise (the dense checkpoint tests' tolerance)


@pytest.mark.parametrize("world,move", [(w, m) for w, ms in MOVES.items() for m in ms],
                         ids=[f"{w}ranks-{m.name}" for w, ms in MOVES.items() for m in ms])
def test_zero1_optimizer_state_loads_under_another_plan(world: int, move: Move,
                                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    _, ranks = results(world, tmp_path_factory)
    source = move if move.src is not None else BY_NAME[move.saved_by]
    saver = ranks if move.src is not None else results(4, tmp_path_factory)[1]
    plain, plain_opt, ref_losses = _plain(move, 1)
    one_step = copy.deepcopy((dict(plain.state_dict()), _plain_optim_state(plain, plain_opt)))
    ref_losses += [_plain_step(plain, plain_opt, step) for step in (1, 2)]
    saved, continued_from = saver[0][source.name]["saved"], saver[0][source.name]
    _same(saved[0], one_step[0], atol=ATOL)  # every rank's slice of the state, in place
    _same_optim(saved[1], one_step[1], atol=ATOL)
    for per_rank in ranks:
        got = per_rank[move.name]
        _same(got["loaded"][0], saved[0])  # restored bit-exactly, model and optimizer
        _same_optim(got["loaded"][1], saved[1])
        _same(got["continued"], continued_from["expected"], atol=ATOL)
        assert got["losses"] == pytest.approx(continued_from["expected_losses"], rel=1e-6)
        assert got["losses"] == pytest.approx(ref_losses[1:], rel=1e-5)
        _same(got["continued"], dict(plain.state_dict()), atol=ATOL)


@pytest.mark.parametrize("move", ONE_PROCESS, ids=[m.name for m in ONE_PROCESS])
def test_a_single_process_loads_a_zero1_checkpoint(move: Move, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Into the plain model and a plain AdamW: bit-equal, and training goes on as one process would."""
    from galvatron.runtime import checkpoint

    root, ranks = results(4, tmp_path_factory)
    plain = MODELS[move.model]()
    cls, kwargs = _optimizer(move)
    opt = cls(plain.parameters(), **kwargs)
    if move.full:
        state = torch.load(checkpoint_path(root, move), weights_only=False)
        plain.load_state_dict(state["model"])
        opt.load_state_dict(_by_index(plain, state["optimizer"]))
    else:
        checkpoint.load(plain, checkpoint_path(root, move), opt)
    saved = ranks[0][move.name]["saved"]
    _same(dict(plain.state_dict()), saved[0])
    _same_optim(_plain_optim_state(plain, opt), saved[1])
    _, _, ref_losses = _plain(move, 3)
    assert [_plain_step(plain, opt, step) for step in (1, 2)] == pytest.approx(ref_losses[1:], rel=1e-5)


def _by_index(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state keyed by name as ``torch.optim.Optimizer.load_state_dict`` wants it."""
    index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def test_a_save_missing_one_ranks_slice_of_the_state_is_refused(tmp_path_factory: pytest.TempPathFactory) -> None:
    _, ranks = results(2, tmp_path_factory)
    for per_rank in ranks:
        assert "a rank's slice is missing" in per_rank["sabotage"], per_rank["sabotage"]
