"""``galvatron demo``: search a plan for local CPU workers and train the reference GPT through Ray.

Runs on any machine with CPUs: starts a local Ray bound to 127.0.0.1, profiles the model and gloo
on this machine for the cost model (:func:`galvatron.launch.launcher.local_cpu_perf`), searches
the fastest plan for ``--workers`` workers, prints it with its predicted step time and trains
:class:`galvatron.models.GPT` in the ``gpt-demo`` shape on Python standard-library source code as
bytes (vocabulary 256), printing step time, tokens/s, MFU and memory as it goes.

The worker side, :func:`train`, is also the reference training loop of the launcher tests:
batches depend only on the step number (never on the rank count or on restarts), so runs under
different plans, world sizes or after a restart from a checkpoint see the same data.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from galvatron.launch.checkpoints import Checkpointer
from galvatron.launch.launcher import (
    CPU_FIXED,
    PlanChoice,
    local_cpu_perf,
    search_plan,
    worker_env,
)
from galvatron.launch.metrics import StepMeter

from galvatron import wrap
from galvatron.models.gpt import GPT, GPTConfig
from galvatron.paths import find_config
from galvatron.spec import ModelSpec


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run of the reference GPT (what every worker runs)."""

    model: str = "gpt-demo"
    """Model preset name (``configs/models``) or YAML path in the reference GPT's keys."""
    steps: int = 300
    global_batch: int = 16
    """Sequences per optimizer step over all workers."""
    lr: float = 3e-3
    warmup: int = 20
    """Linear learning-rate warm-up steps (then constant)."""
    seed: int = 0
    print_every: int = 20
    checkpoint_interval: int = 0
    """Steps between checkpoints (0: none); the folder is ``GALVATRON_CHECKPOINT_DIR``."""
    keep_checkpoints: int | None = 2
    step_delay_s: float = 0.0
    """Sleep after each step (fault-tolerance drills: leaves time to kill a worker mid-run)."""
    return_state: bool = False
    """Rank 0 returns the final full model and optimizer state (for comparisons in tests)."""


@dataclass
class TrainResult:
    """What one worker reports when training ends."""

    rank: int
    start_step: int
    """Step training started from (non-zero after resuming from a checkpoint)."""
    losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, mean loss over ranks) at every printed step."""
    step_seconds: list[float] = field(default_factory=list)
    """Wall time of each step this worker ran after the learning-rate warm-up (optimizer included)."""
    model_state: dict[str, torch.Tensor] | None = None
    optimizer_state: dict | None = None


def gpt_config(model: str) -> GPTConfig:
    """The reference GPT's config from a model preset or YAML."""
    return GPTConfig(**yaml.safe_load(find_config("models", model).read_text()))


_CORPUS_MODULES = ("argparse", "dataclasses", "inspect", "textwrap", "typing")


@lru_cache(maxsize=1)
def corpus() -> torch.Tensor:
    """The source of a few Python standard-library modules as one stream of byte tokens: text with
    structure to learn, the same on every worker and for the whole run."""
    files = [Path(importlib.util.find_spec(name).origin) for name in _CORPUS_MODULES]
    data = b"\n".join(p.read_bytes() for p in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


@lru_cache(maxsize=4)
def corpus_tokens(vocab: int) -> torch.Tensor:
    """:func:`corpus` as token ids of a ``vocab``-sized vocabulary (bytes taken modulo it), computed once
    (over the whole corpus it took 1 ms a step on one thread)."""
    return corpus() % vocab


def global_batch(step: int, config: TrainConfig, gpt: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of step ``step``: ``global_batch`` random windows of the corpus
    (bytes taken modulo the vocabulary)."""
    text, seq_len = corpus_tokens(gpt.vocab), gpt.seq_len
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    starts = torch.randint(0, len(text) - seq_len - 1, (config.global_batch,), generator=gen)
    windows = torch.stack([text[s: s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def train(config: TrainConfig) -> TrainResult:
    """Train the reference GPT on this worker under the plan in ``GALVATRON_PLAN`` (``wrap`` reads it;
    without one it searches), resuming from the newest checkpoint in ``GALVATRON_CHECKPOINT_DIR``;
    call on every rank."""
    torch.set_num_threads(1)
    gpt = gpt_config(config.model)
    torch.manual_seed(config.seed)
    model = wrap(GPT(gpt))
    optimizer = model.optimizer(torch.optim.AdamW, lr=config.lr)
    checkpointer = Checkpointer.from_env(config.checkpoint_interval, config.keep_checkpoints)
    start = checkpointer.resume(model, optimizer) if checkpointer else 0
    meter = StepMeter(tokens_per_step=config.global_batch * gpt.seq_len, total_steps=config.steps,
                      flops_per_token=ModelSpec.from_config(config.model).flops_per_token(), every=config.print_every)
    result = TrainResult(rank=torch.distributed.get_rank(), start_step=start)
    for step in range(start, config.steps):
        started = time.perf_counter()
        for group in optimizer.param_groups:  # a function of the step alone: restarts need no scheduler state
            group["lr"] = config.lr * min(1.0, (step + 1) / max(config.warmup, 1))
        inputs, targets = global_batch(step, config, gpt)
        loss = model.train_step(model.shard_batch((inputs, targets)), lm_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats = meter.step(step, loss)
        if step >= config.warmup:
            result.step_seconds.append(time.perf_counter() - started)
        if stats is not None:
            result.losses.append((stats.step, stats.loss))
        if checkpointer:
            checkpointer.maybe_save(step + 1, model, optimizer)
        time.sleep(config.step_delay_s)
    if config.return_state:
        result.model_state, result.optimizer_state = full_state(model, optimizer)
    return result


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
    """A copy of the unsharded model and optimizer state keyed by parameter name (ZeRO-1 slices
    gathered too), on rank 0 (None elsewhere); every rank calls it."""
    from galvatron.runtime.checkpoint import full_optimizer_state_dict, full_state_dict

    state = full_state_dict(model), full_optimizer_state_dict(model, optimizer)
    return state if torch.distributed.get_rank() == 0 else (None, None)


# ============================================================================ driver side
@dataclass(frozen=True, kw_only=True)
class DemoResult:
    """The demo's plan, the loss curve rank 0 printed and how long it all took."""

    choice: PlanChoice
    losses: list[tuple[int, float]]
    wall_s: float
    restarts: int
    step_seconds: list[float] = field(default_factory=list)
    """Rank 0's step times after the warm-up."""


def run_demo(config: TrainConfig, *, workers: int = 4, checkpoint_dir: str | None = None,
             max_restarts: int = 2) -> DemoResult:
    """Plan for ``workers`` local CPU workers, then train on them through Ray."""
    from galvatron.launch.ray_launcher import RayConfig, RayLauncher

    start = time.perf_counter()
    spec = ModelSpec.from_config(config.model)
    print(f"galvatron demo: {spec.summary()}; {workers} CPU workers, global batch {config.global_batch} x "
          f"{spec.seq_len} tokens, {config.steps} steps", flush=True)
    perf = local_cpu_perf(spec, workers, model=config.model)
    choice = search_plan(spec, workers, cluster=perf, global_batch=config.global_batch, fixed=CPU_FIXED)
    peak = perf.peak_flops("fp32")
    print(choice.describe(), flush=True)
    env = worker_env(choice, peak_flops=peak, checkpoint_dir=checkpoint_dir,
                     checkpoint_interval=config.checkpoint_interval if checkpoint_dir else None)
    launcher = RayLauncher(RayConfig(workers=workers, plan=choice.plan, env=env, max_restarts=max_restarts))
    results = launcher.run(train, config)
    return DemoResult(choice=choice, losses=results[0].losses, wall_s=time.perf_counter() - start,
                      restarts=launcher.restarts, step_seconds=results[0].step_seconds)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options (shared by ``galvatron demo`` and ``python -m``)."""
    defaults = TrainConfig()
    parser.add_argument("--workers", type=int, default=4, help="local CPU workers (default 4)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"training steps (default {defaults.steps})")
    parser.add_argument("--model", default=defaults.model, help="model preset or YAML (default gpt-demo)")
    parser.add_argument("--global-batch", type=int, default=defaults.global_batch,
                        help=f"sequences per step (default {defaults.global_batch})")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"AdamW learning rate (default {defaults.lr})")
    parser.add_argument("--print-every", type=int, default=defaults.print_every, help="steps between progress lines")
    parser.add_argument("--checkpoint-dir", help="save checkpoints here and resume from the newest")
    parser.add_argument("--checkpoint-interval", type=int, default=50, help="steps between checkpoints (default 50)")


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; exit code 0 when the loss went down."""
    config = TrainConfig(model=args.model, steps=args.steps, global_batch=args.global_batch, lr=args.lr,
                         print_every=args.print_every, checkpoint_interval=args.checkpoint_interval)
    result = run_demo(config, workers=args.workers, checkpoint_dir=args.checkpoint_dir)
    if not result.losses:
        print("galvatron demo: no steps were run", file=sys.stderr)
        return 1
    first, last = result.losses[0][1], result.losses[-1][1]
    verdict = "decreased" if last < first else "did NOT decrease"
    print(f"galvatron demo: loss {first:.3f} -> {last:.3f} over {config.steps} steps ({verdict}); "
          f"{result.wall_s:.0f} s in all, {result.restarts} restart(s)", flush=True)
    predicted = result.choice.predicted_step_s
    if result.step_seconds and predicted:
        measured = statistics.median(result.step_seconds)
        print(f"galvatron demo: median step {measured:.3f} s after the warm-up, {predicted:.3f} s predicted "
              f"({predicted / measured - 1:+.1%})", flush=True)
    return 0 if last < first else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m galvatron.launch.demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    # run the importable module's main, so Ray pickles ``train`` by reference, not as ``__main__.train``
    from galvatron.launch.demo import main as module_main

    sys.exit(module_main())
