"""Exactness harness for ``galvatron.wrap`` (imported by the other ``test_runtime_*`` files), and
the checks that it can fail.

A case trains one tiny model under one plan for three steps of SGD with momentum (updates
proportional to the gradient, so a gradient off by any factor shows) on forked gloo ranks; the
loss of every step and every parameter on every rank afterwards must equal single-process
training of the same initial weights on the same batches. All cases of one world size run in
one launch; references are computed once per model in the parent. What pipeline shape inference
leaves uninitialised holds different values on every rank (:func:`garbage_per_rank`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from galvatron.models.gpt import GPT, GPTConfig
from galvatron.plan import Plan
from galvatron.testing import RankFailure, run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_pipeline_split import MODELS as HF_MODELS  # tiny GPT-2 / Llama / Mixtral, shared fixtures
from test_pipeline_split import SEQ, VOCAB

pytestmark = pytest.mark.slow

BATCH, STEPS, LR, MOMENTUM, LAYERS, ADAM_EPS = 8, 3, 0.2, 0.9, 4, 1e-4


def _gpt(**overrides: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return GPT(GPTConfig(**{"layers": LAYERS, "hidden": 32, "heads": 4, "vocab": VOCAB, "seq_len": SEQ,
                                "ffn_hidden": 64, **overrides}))

    return build


def _hf(name: str) -> Callable[[], nn.Module]:
    return lambda: HF_MODELS[name].build(LAYERS)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "gpt": _gpt(),
    "gpt-swiglu-gqa": _gpt(activation="swiglu", norm="rmsnorm", kv_heads=2),
    "gpt-tied": _gpt(tied_embeddings=True, position="learned"),
    "gpt-tied-odd-vocab": _gpt(tied_embeddings=True, position="learned", vocab=VOCAB + 1),  # tp 2 splits it 33 / 32
    "gpt-moe": _gpt(experts=4, top_k=2, shared_experts=1, moe_every=2),
    "gpt2": _hf("gpt2"),
    "llama": _hf("llama"),
    "mixtral": _hf("mixtral"),
}


@dataclass(frozen=True)
class Case:
    """One model trained under one plan. ``plain``: call ``model(x)`` and ``loss.backward()``
    instead of ``train_step``. ``compile``: a ``torch.compile`` backend; the compiled model is called
    as ``plain`` calls the model. ``sabotage``: drop the gradient reduction (must then fail)."""

    name: str
    model: str
    plan: Plan
    plain: bool = False
    adam: bool = False
    sabotage: bool = False
    compile: str | None = None
    tp_plan: dict[str, str] | None = field(default=None, hash=False)


def uniform(world: int, **strategy: Any) -> Plan:
    """A one-stage plan over ``world`` ranks with one strategy; dp fills the rest."""
    per_copy = strategy.get("tp", 1) * strategy.get("cp", 1)
    return Plan.uniform(LAYERS, global_batch_size=BATCH, dtype="fp32", dp=world // per_copy, **strategy)


def plan_dict(world: int, layers: list[dict[str, Any]], **extra: Any) -> Plan:
    """A one-stage plan over ``world`` ranks from per-range overrides."""
    stage = {"devices": world, "layers": layers}
    return Plan.from_dict({"global_batch_size": BATCH, "dtype": "fp32", "stages": [stage], **extra})


def loss_fn(out: Any, targets: torch.Tensor) -> torch.Tensor:
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [tuple(torch.randint(0, VOCAB, (2, BATCH, SEQ), generator=g)) for _ in range(STEPS)]


def _optimizer(params: Any, adam: bool) -> torch.optim.Optimizer:
    if adam:
        return torch.optim.AdamW(params, lr=1e-2, eps=ADAM_EPS)
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def reference(model: str, adam: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process training: the losses and the final parameters by name."""
    net = MODELS[model]()
    opt = _optimizer(net.parameters(), adam)
    losses = []
    for tokens, targets in batches():
        loss = loss_fn(net(tokens), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in net.named_parameters(remove_duplicate=False)}


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().to("cpu", copy=True)


def _local_numel(t: torch.Tensor) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).numel()


def train(case: Case) -> dict[str, Any]:
    """On a rank: wrap, train, and return losses, full parameters and what the rank stores (compiled:
    also dynamo's graph breaks and graphs)."""
    import galvatron

    model = galvatron.wrap(MODELS[case.model](), case.plan, tp_plan=case.tp_plan)
    forward = model
    if case.compile:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        forward = torch.compile(model, backend=case.compile)
    if case.sabotage:
        model._galvatron.sync.buckets.clear()
    opt = model.optimizer(torch.optim.AdamW, lr=1e-2, eps=ADAM_EPS) if case.adam else \
        model.optimizer(torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    losses = []
    for tokens, targets in batches():
        x, y = model.shard_batch((tokens, targets))
        if case.plain or case.compile:
            x, y = x.to(model._galvatron.device), y.to(model._galvatron.device)
            loss = loss_fn(forward(x), y)
            loss.backward()
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        else:
            loss = model.train_step((x, y), loss_fn)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    params = {n: _full(p) for n, p in model.named_parameters(remove_duplicate=False)}
    state = sum(t.numel() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    out = {"losses": losses, "params": params, "stored": sum(_local_numel(p) for p in model.parameters()),
           "opt_state": state}
    if case.compile:
        counters = torch._dynamo.utils.counters
        out.update(graph_breaks=sum(counters["graph_break"].values()), graphs=counters["stats"]["unique_graphs"])
    return out


def wrapped_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    """One ``train_step`` of a wrapped model on batch ``step`` of :func:`batches`, then the optimizer."""
    loss = model.train_step(model.shard_batch(batches()[step]), loss_fn)
    opt.step()
    opt.zero_grad()
    return loss.item()


def checkpoint_path(root: str | Path, case: Any) -> Path:
    """Where a checkpoint case (``name``; ``full``: one file) is saved under ``root``."""
    return Path(root) / (f"{case.name}.pt" if case.full else case.name)


def garbage_per_rank() -> None:
    """Fill the inputs torch's pipeline shape inference materialises from metadata (uninitialised
    memory, which may hold anything) with values that differ by rank, so that a stage whose
    collectives depend on them (a MoE block's routing under TP) fails every time, not now and then."""
    from torch.distributed.pipelining import _utils

    if not hasattr(_utils, "_TensorMeta"):  # torch <= 2.11: shape inference runs on torch.zeros_like
        return
    to_tensor = _utils._TensorMeta.to_tensor

    def garbage(meta: Any, device: Any) -> torch.Tensor:
        t = to_tensor(meta, device)
        if t.is_floating_point():
            with torch.no_grad():
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(dist.get_rank())))
        return t

    _utils._TensorMeta.to_tensor = garbage


def train_each(cases: list[Case], train_case: Callable[[Case], dict[str, Any]] = train) -> dict[str, Any]:
    """``train_case`` of every case on this rank, by name, with :func:`garbage_per_rank`. An error
    names its case: it fails every case of the launch."""
    garbage_per_rank()
    out = {}
    for case in cases:
        try:
            out[case.name] = train_case(case)
        except Exception as err:
            err.add_note(f"in case {case.name!r}")
            raise
    return out


_RESULTS: dict[tuple[str, int], tuple[dict[tuple[str, bool], Any], list[dict[str, Any]]] | RankFailure] = {}


def results(key: str, world: int, cases: list[Case], backend: str = "gloo",
            rank_main: Callable[[list[Case]], dict[str, Any]] = train_each,
            ) -> tuple[dict[tuple[str, bool], Any], list[dict[str, Any]]]:
    """(references by (model, adam), per-rank results by case name): one launch per key and world
    (``backend="nccl"``: one GPU per rank; the references stay single-process CPU runs), running
    ``rank_main(cases)`` on every rank. A failed launch fails every case of it, without another."""
    if (key, world) not in _RESULTS:
        refs = {(c.model, c.adam): reference(c.model, c.adam) for c in cases}
        try:
            _RESULTS[key, world] = refs, run_ranks(rank_main, world, cases, timeout=600, backend=backend)
        except RankFailure as err:
            _RESULTS[key, world] = err
    found = _RESULTS[key, world]
    if isinstance(found, RankFailure):
        raise RankFailure(str(found))
    return found


def mismatches(refs: dict[tuple[str, bool], Any], ranks: list[dict[str, Any]], case: Case,
               scale: float = 1.0) -> list[str]:
    """What differs from single-process training, on any rank (empty when everything matches).
    Without a pipeline every rank holds every parameter; with one, each rank holds its stages'.
    ``scale`` widens the float32 tolerances (GPU kernels against a CPU reference)."""
    ref_losses, ref_params = refs[case.model, case.adam]
    problems, held = [], set()
    for rank, per_rank in enumerate(ranks):
        result = per_rank[case.name]
        if not torch.allclose(torch.tensor(result["losses"]), torch.tensor(ref_losses), rtol=1e-5 * scale,
                              atol=1e-6 * scale):
            problems.append(f"rank {rank} losses {result['losses']} != {ref_losses}")
        names = set(result["params"])
        held |= names
        if not names <= set(ref_params) or (case.plan.pp == 1 and names != set(ref_params)):
            problems.append(f"rank {rank} parameter names differ: {names ^ set(ref_params)}")
            continue
        for name, value in result["params"].items():
            if not torch.allclose(value, ref_params[name], rtol=1e-4 * scale,
                                  atol=(1e-5 if case.adam else 1e-6) * scale):
                err = (value - ref_params[name]).abs().max().item()
                problems.append(f"rank {rank} {name} differs by {err:.2e}")
    if held != set(ref_params):
        problems.append(f"no rank holds {sorted(set(ref_params) - held)}")
    return problems


def check(key: str, world: int, cases: list[Case], case: Case, backend: str = "gloo") -> dict[str, Any]:
    """Assert ``case`` matched single-process training; return rank 0's result."""
    refs, ranks = results(key, world, cases, backend)
    problems = mismatches(refs, ranks, case, scale=1.0 if backend == "gloo" else 10.0)
    assert not problems, "\n".join(problems[:20])
    return ranks[0][case.name]


def total_params(model: str) -> int:
    return sum(p.numel() for p in MODELS[model]().parameters())


# ------------------------------------------------------------------ the harness can fail
CONTROLS = [
    Case("dp-no-grad-sync", "gpt", uniform(2), sabotage=True),
    Case("zero1-no-grad-sync", "gpt", uniform(2, zero=1), sabotage=True),
    Case("dp-ok", "gpt", uniform(2)),
]


def test_a_missing_gradient_reduction_is_caught():
    refs, ranks = results("controls", 2, CONTROLS)
    assert not mismatches(refs, ranks, CONTROLS[-1])
    for case in CONTROLS[:-1]:
        assert any("differs" in p for p in mismatches(refs, ranks, case)), case.name
