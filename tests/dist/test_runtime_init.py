"""Where ``galvatron.wrap`` builds a model. A model built on the meta device is sharded, its local
shards materialised (nothing larger is allocated) and loaded from a checkpoint of a seeded
single-process model; it then trains exactly as that model does, under several plans in one launch
of 2 gloo ranks (see test_runtime_harness). A model on the CPU is never moved to the device whole:
what wrap itself moves there is at most what the rank keeps. Meta buffers that nothing recomputes
are refused before any process group starts."""

from __future__ import annotations

import functools
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runtime_harness import (
    BATCH,
    LAYERS,
    LR,
    MODELS,
    MOMENTUM,
    STEPS,
    Case,
    batches,
    loss_fn,
    mismatches,
    plan_dict,
    results,
    uniform,
    wrapped_step,
)

from galvatron.errors import GalvatronError
from galvatron.models.gpt import rope_cache
from galvatron.plan import Plan
from galvatron.testing import LiveBytes

pytestmark = pytest.mark.slow

WORLD = 2


@dataclass(frozen=True)
class MetaCase(Case):
    """A model built on the meta device. ``buffers``: how its RoPE tables get their values
    (``assign``: real tensors assigned before wrap; ``hook``: an ``init_buffers`` method; ``none``: the
    model recomputes them itself, or has none). ``checkpoint``: ``full`` (one file) or ``dcp``."""

    buffers: str = "none"
    checkpoint: str = "full"


def _pipeline() -> Plan:
    return Plan.uniform(LAYERS, global_batch_size=BATCH, num_micro_batches=4, pp=2, dtype="fp32", dp=1)


def _ep_zero3() -> Plan:
    """ZeRO-3 blocks; the MoE ones (every other block) split their experts over 2 ranks."""
    return plan_dict(WORLD, [{"range": [i, i + 1], "zero": 3, **({"ep": 2} if i % 2 == 0 else {})}
                             for i in range(LAYERS)])


CASES = [
    MetaCase("gpt-zero3-offload", "gpt", uniform(WORLD, zero=3, offload=True), buffers="assign"),
    MetaCase("gpt-tp-sp", "gpt", uniform(WORLD, tp=2, sp=True), buffers="hook", checkpoint="dcp"),
    MetaCase("gpt-pp2", "gpt", _pipeline(), buffers="hook"),
    # tied embeddings in one FSDP unit, sharded unevenly (65 rows on 2 ranks), next to TP + SP blocks
    MetaCase("tied-odd-vocab-mixed", "gpt-tied-odd-vocab",
             plan_dict(WORLD, [{"range": [0, 2], "tp": 2, "sp": True}, {"range": [2, 4], "zero": 3}],
                       embedding={"zero": 3}, head={"zero": 3}), checkpoint="dcp"),
    # experts split over 2 ranks (reduced by the gradient sync, ignored by FSDP2) in ZeRO-3 blocks
    MetaCase("moe-ep2-zero3", "gpt-moe", _ep_zero3(), buffers="assign", checkpoint="dcp"),
    # Hugging Face rotary embeddings; a plain backward, which relies on the gradient hooks
    MetaCase("llama-dp-plain-backward", "llama", uniform(WORLD), plain=True),
]
PLACED = {"zero3": uniform(WORLD, zero=3), "tp-sp": uniform(WORLD, tp=2, sp=True), "pp2": _pipeline()}


def _rope_tables(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config
    return rope_cache(cfg.seq_len, cfg.hidden // cfg.heads)


def _meta_model(case: MetaCase) -> nn.Module:
    with torch.device("meta"):
        model = MODELS[case.model]()
    if case.buffers == "assign":
        model.rope_cos, model.rope_sin = _rope_tables(model)
    elif case.buffers == "hook":
        def init_buffers() -> None:
            cos, sin = _rope_tables(model)
            model.rope_cos.copy_(cos)
            model.rope_sin.copy_(sin)

        model.init_buffers = init_buffers
    return model


def _bytes(tensors: Any) -> int:
    local = (t.to_local() if hasattr(t, "to_local") else t for t in tensors)
    return sum(t.numel() * t.element_size() for t in local)


def _train_meta(root: str, case: MetaCase) -> dict[str, Any]:
    """Wrap the meta-built model (counting what wrap allocates), load the checkpoint, train."""
    import galvatron
    from galvatron.runtime import checkpoint

    model = _meta_model(case)
    with LiveBytes() as live:
        model = galvatron.wrap(model, case.plan)
    kept = _bytes([*model.parameters(), *model.buffers()])
    checkpoint.load(model, Path(root) / (f"{case.model}.pt" if case.checkpoint == "full" else case.model))
    opt = model.optimizer(torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    losses = [_plain_step(model, opt, step) if case.plain else wrapped_step(model, opt, step)
              for step in range(STEPS)]
    params = checkpoint.full_state_dict(model)  # expert-parallel layers hold only their experts
    return {"losses": losses, "params": params, "allocated": live.peak, "kept": kept}


def _plain_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    """``loss.backward()`` on this rank's shard (the gradient hooks reduce), then the optimizer."""
    x, y = model.shard_batch(batches()[step])
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    loss = loss.detach()
    dist.all_reduce(loss)
    return loss.item() / dist.get_world_size()


def _placement(plan: Plan) -> dict[str, int]:
    """Wrap a CPU-built model for a device that differs from the CPU only by name (``cpu:0``), counting
    the bytes of every tensor sent there with ``Tensor.to``, against the bytes the rank keeps."""
    import galvatron
    from galvatron.runtime import apply

    device, moved = torch.device("cpu", 0), [0]
    to, init = torch.Tensor.to, apply.init_distributed

    def spy(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target) == device:
            moved[0] += self.numel() * self.element_size()
        return to(self, *args, **kwargs)

    torch.Tensor.to, apply.init_distributed = spy, lambda timeout: device
    try:
        model = galvatron.wrap(MODELS["gpt"](), plan)
    finally:
        torch.Tensor.to, apply.init_distributed = to, init
    return {"moved": moved[0], "kept": _bytes([*model.parameters(), *model.buffers()])}


def _rank_main(root: str, cases: list[MetaCase]) -> dict[str, Any]:
    from test_runtime_harness import train_each

    out = train_each(cases, functools.partial(_train_meta, root))
    out["placement"] = {name: _placement(plan) for name, plan in PLACED.items()}
    return out


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict[str, Any]]]:
    """Checkpoints of the seeded models (the references' initial weights), then the one launch."""
    root = tmp_path_factory.mktemp("init")
    for name in {case.model for case in CASES}:
        state = MODELS[name]().state_dict()
        torch.save({"model": state}, root / f"{name}.pt")
        with warnings.catch_warnings():  # no process group: DCP saves as one process, and says so
            warnings.simplefilter("ignore")
            dcp.save({"model": state}, checkpoint_id=root / name)
    return results("init", WORLD, CASES, rank_main=functools.partial(_rank_main, str(root)))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_meta_model_trains_from_a_checkpoint_as_single_process(launch: Any, case: MetaCase) -> None:
    refs, ranks = launch
    problems = mismatches(refs, ranks, case)
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_meta_model_allocates_only_what_the_rank_keeps(launch: Any, case: MetaCase) -> None:
    _, ranks = launch
    total = _bytes(MODELS[case.model]().parameters())
    for result in ranks:
        got = result[case.name]
        assert got["allocated"] <= got["kept"] + 4096, got  # + what an init_buffers hook computes
        if case.plan.pp > 1 or case.plan.stages[0].groups[0].strategy.zero >= 2:
            assert got["kept"] < 0.75 * total


@pytest.mark.parametrize("plan", list(PLACED))
def test_wrap_moves_to_the_device_only_what_the_rank_keeps(launch: Any, plan: str) -> None:
    """Fails when wrap moves the whole model first (``model.to(device)``): the rank keeps shards."""
    _, ranks = launch
    for result in ranks:
        placed = result["placement"][plan]
        assert 0 < placed["moved"] <= placed["kept"], placed


def test_meta_buffers_nothing_recomputes_are_refused() -> None:
    """Before any process group starts, naming the buffers."""
    import galvatron

    with torch.device("meta"):
        model = MODELS["gpt"]()
    model.init_buffers = None  # a model with no way to recompute its RoPE tables
    try:
        with pytest.raises(GalvatronError, match="rope_cos, rope_sin"):
            galvatron.wrap(model, uniform(WORLD))
        with pytest.raises(GalvatronError, match="meta device"):
            galvatron.wrap(model, uniform(WORLD), backend="deepspeed")
        assert not dist.is_initialized()
    finally:  # a wrap that got past the check started one: the tests after this one must not inherit it
        if dist.is_initialized():
            dist.destroy_process_group()
