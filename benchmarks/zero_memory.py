"""Measured vs predicted peak memory per rank of data-parallel plans (ZeRO 0/1/2/3) on CPU gloo ranks.

A Llama-like reference GPT (fp32, AdamW through ``model.optimizer``) trains ``--steps`` steps under
each plan on forked gloo ranks bound to 127.0.0.1 (``galvatron.testing.run_ranks``). A rank's live
bytes are those of its live tensor storages (:class:`galvatron.testing.LiveBytes`, counting from
before the model is built), so their peak is what ``max_memory_allocated`` is on a GPU. The peak of
the last step is compared with ``cost_plan(...).peak_memory_gib`` under the native runtime's
``CostOptions`` and its parts (parameters, gradients, optimizer states, activations, buffers). Also
reported: live bytes at the end of each phase of the last step and the peak within it, and what
stays allocated once the wrapped model and its optimizer are deleted (a second plan measured in the
same process, as ``benchmarks/multi_gpu/plans.py`` measures its grid, starts on top of it).

    python benchmarks/zero_memory.py --out benchmarks/results/zero_memory.md
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from galvatron.strategies.cost import CostOptions, cost_plan

from galvatron.backends import capabilities
from galvatron.models import GPT, GPTConfig
from galvatron.plan import Plan
from galvatron.runtime.apply import local_cluster
from galvatron.spec import ModelSpec
from galvatron.testing import LiveBytes, run_ranks

MIB = 2**20
CONFIG = GPTConfig(layers=4, hidden=512, heads=8, ffn_hidden=1376, vocab=8192, seq_len=128, activation="swiglu",
                   norm="rmsnorm", position="rope")
PLANS = {"dp1": (1, {}), "dp2-zero0": (2, {"zero": 0}), "dp2-zero1": (2, {"zero": 1}),
         "dp2-zero2": (2, {"zero": 2}), "dp2-zero3": (2, {"zero": 3}), "tp2": (2, {"dp": 1, "tp": 2}),
         "tp2-sp": (2, {"dp": 1, "tp": 2, "sp": True})}


def plan_of(name: str, batch: int, dtype: str = "fp32") -> Plan:
    world, strategy = PLANS[name]
    return Plan.uniform(CONFIG.layers, global_batch_size=batch, dtype=dtype, **{"dp": world, **strategy})


def predicted(plan: Plan) -> dict[str, float]:
    """The cost model's peak and its parts (MiB per rank) for ``plan`` as the native runtime runs it."""
    spec = ModelSpec.from_config(CONFIG.to_model_config())
    stack = CostOptions(**capabilities("native").cost_options(accelerator=False))  # CPU workers
    cost = cost_plan(plan, spec, local_cluster(plan.world_size), stack)
    return {k: v * 1024 for k, v in cost.stages[0].memory_gib.items()}


def measure(name: str, batch: int, steps: int, dtype: str = "fp32") -> dict[str, Any]:
    """One rank's live bytes (:class:`galvatron.testing.LiveBytes`) at the end of each phase of the
    last step, the peak within each phase, and what stays allocated after the model and optimizer
    are deleted."""
    import galvatron

    plan = plan_of(name, batch, dtype)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CONFIG.vocab, (batch, CONFIG.seq_len + 1), generator=gen)
    out: dict[str, int] = {}

    def phase(name: str) -> None:
        out[name], out[f"{name} peak"] = live.live, live.peak
        live.reset_peak()

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        phase("forward")
        return loss

    with LiveBytes() as live:
        torch.manual_seed(0)
        wrapped = galvatron.wrap(GPT(CONFIG), plan=plan)
        opt = wrapped.optimizer(torch.optim.AdamW, lr=1e-4)
        x, y = wrapped.shard_batch((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
        for _ in range(steps):
            phase("start")
            wrapped.train_step((x, y), loss_fn)
            phase("backward")
            opt.step()
            phase("step")
            opt.zero_grad(set_to_none=True)
            phase("zero_grad")
        del wrapped, opt, x, y
        gc.collect()
        phase("del")
    out["peak"] = max(out[f"{k} peak"] for k in PHASES)
    return out


PHASES = ("forward", "backward", "step", "zero_grad")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="Markdown file for the table (printed too)")
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--steps", type=int, default=2, help="steps; the peak is the last one's")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="the plan's compute dtype (bf16: autocast on CPU over fp32 parameters)")
    args = parser.parse_args(argv)
    rows = []
    for name in args.plans:
        world = PLANS[name][0]
        ranks = run_ranks(measure, world, name, args.batch, args.steps, args.dtype, timeout=600)
        rows.append({"plan": name, "predicted": predicted(plan_of(name, args.batch, args.dtype)), "ranks": ranks})
        print(json.dumps(rows[-1]), flush=True)
    lines = _table(rows, args)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    params = sum(p.numel() for p in GPT(CONFIG).parameters())
    command = "python benchmarks/zero_memory.py " + " ".join(sys.argv[1:])
    lines = [f"Command: `{command}` (torch {torch.__version__}, CPU, gloo)", "",
             f"Model: {CONFIG}, {params / 1e6:.1f} M parameters ({params * 4 / MIB:.0f} MiB fp32); "
             f"global batch {args.batch}, AdamW, {args.dtype}; the last of {args.steps} steps. MiB per rank. "
             "Phases: forward (to the loss), backward (with the gradient reduction: the end of "
             "`train_step`), step (`opt.step()`), zero_grad; `live/peak` is the live bytes at the "
             "phase's end / the most within it; 'del': live after the model and optimizer are deleted.", "",
             "| plan | rank | measured peak | predicted | error | params | grads | optimizer | activations "
             "| buffers | start | " + " | ".join(PHASES) + " | del |",
             "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(PHASES) + "---|"]
    for row in rows:
        p = row["predicted"]
        for r, m in enumerate(row["ranks"]):
            err = p["total"] / (m["peak"] / MIB) - 1
            phases = " | ".join(f"{m[k] / MIB:.1f} / {m[f'{k} peak'] / MIB:.1f}" for k in PHASES)
            lines.append(f"| {row['plan']} | {r} | {m['peak'] / MIB:.1f} | {p['total']:.1f} | {err:+.1%} | "
                         f"{p['params']:.1f} | {p['grads']:.1f} | {p['optimizer']:.1f} | {p['activations']:.1f} | "
                         f"{p['buffers']:.1f} | {m['start'] / MIB:.1f} | {phases} | {m['del'] / MIB:.1f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
