"""Wrapped vs hand-written training throughput of the reference GPT on one GPU, side by side.

Both sides train the same model (same weights, same batches) with bf16 autocast, SDPA attention
(PyTorch's dispatch: cuDNN attention on an H100 with torch 2.11) and fused AdamW; compiled runs
compile the model and the loss function of each side; the wrapped side goes through
``galvatron.wrap`` with a one-GPU plan. Timings alternate between the two sides in blocks
(A B B A B A A B, each after the same idle pause) so drift hits both alike; the result is their
ratio. Two 1-2B models with AdamW states and activations do not fit one 80 GiB GPU together, so
the idle side waits in host memory (parked) while the other runs.

MFU = achieved model FLOP/s / peak. Model FLOPs per token (PaLM, Chowdhery et al. 2022, App. B):
``6 * N + 12 * L * d * s`` with N every matmul weight (the LM head included, embeddings
excluded), L layers, d hidden, s sequence; the
attention term counts the full s x s product (causal masking not subtracted), as Megatron and
PaLM do. Peak: dense bf16 989 TFLOP/s for an H100 SXM (NVIDIA H100 datasheet).

    python benchmarks/gpu_speed.py --compile eager --steps 12 --warmup 3 --out benchmarks/results/gpu_speed_eager.json
    python benchmarks/gpu_speed.py --compile compiled --steps 12 --warmup 3 \
        --out benchmarks/results/gpu_speed_compiled.json
    python benchmarks/gpu_speed.py --smoke --out /tmp/gpu_speed.json     # tiny model on CPU

On one H100 each case takes 2-4 minutes (compiled ones longer: two models and two losses compile),
so under a 10-minute limit run ``--compile eager`` and ``--compile compiled`` as separate commands;
results are written after every case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import galvatron
from galvatron.models import GPT, GPTConfig

H100_BF16_PEAK = 989e12
IDLE_BEFORE_BLOCK_S = 2.0


@dataclass
class Case:
    name: str
    cfg: GPTConfig
    batch: int


CASES = {
    "gpt-1.4b": Case("gpt-1.4b", GPTConfig(vocab=50304, seq_len=2048, layers=24, hidden=2048, heads=16), 8),
    "gpt-2b": Case("gpt-2b", GPTConfig(vocab=50304, seq_len=4096, layers=8, hidden=4096, heads=32), 2),
    "smoke": Case("smoke", GPTConfig(vocab=128, seq_len=64, layers=2, hidden=64, heads=4), 2),
}


def model_flops_per_token(cfg: GPTConfig, model: torch.nn.Module) -> float:
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embeddings" not in n)
    return 6.0 * matmul + 12.0 * cfg.layers * cfg.hidden * cfg.seq_len


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class Side:
    """One way of training the model: a step function and its optimizer."""

    def __init__(self, name: str, model: torch.nn.Module, step_model: Callable, device: torch.device,
                 autocast: bool, loss: Callable = loss_fn) -> None:
        self.name, self.model, self.step_model, self.autocast = name, model, step_model, autocast
        self.loss = loss
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        self.times: list[float] = []
        self.device = device

    def park(self, where: torch.device) -> None:
        """Move parameters, gradients and optimizer states to ``where`` (same tensors, new storage)."""
        self.model.to(where)
        for state in self.opt.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    state[key] = value.to(where)

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss(self.step_model(tokens), targets)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(case: Case, compiled: bool, steps: int, warmup: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    base = GPT(case.cfg).to(device)
    hand = GPT(case.cfg).to(device)
    hand.load_state_dict(base.state_dict())
    plan = galvatron.Plan.uniform(case.cfg.layers, global_batch_size=case.batch, dtype="bf16")
    wrapped = galvatron.wrap(base, plan=plan)
    hand_fwd = torch.compile(hand) if compiled else hand
    wrapped_fwd = torch.compile(wrapped) if compiled else wrapped
    # the wrapped side's dtype policy comes from the plan (bf16): it must not need an outer autocast
    # compiled: the loss too, on both sides (one compiled function each: the fp32 logits of
    # cross-entropy are never materialised)
    hand_loss, wrapped_loss = (torch.compile(loss_fn), torch.compile(loss_fn)) if compiled else (loss_fn, loss_fn)
    sides = [Side("hand-written", hand, hand_fwd, device, autocast=True, loss=hand_loss),
             Side("galvatron.wrap", wrapped, wrapped_fwd, device, autocast=False, loss=wrapped_loss)]
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, case.cfg.vocab, (case.batch, case.cfg.seq_len + 1), generator=gen).to(device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    losses: dict[str, list[float]] = {s.name: [] for s in sides}
    peak: dict[str, float] = {}
    cpu = torch.device("cpu")
    sides[1].park(cpu)
    # A B B A then B A A B: each side runs first, last and in the middle equally often; every block
    # starts after the same idle pause, so clock and temperature drift cannot favour one side
    order = [0, 1, 1, 0, 1, 0, 0, 1]
    warmed: set[int] = set()
    for index in order:
        side = sides[index]
        sides[1 - index].park(cpu)
        side.park(device)
        if index not in warmed:
            warmed.add(index)
            for _ in range(warmup):
                side.step(x, y)
        sync(device)
        time.sleep(IDLE_BEFORE_BLOCK_S if device.type == "cuda" else 0.0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(max(1, steps // 4)):
            start = time.perf_counter()
            loss = side.step(x, y)
            sync(device)
            side.times.append(time.perf_counter() - start)
            losses[side.name].append(float(loss.detach()))
        if device.type == "cuda":
            peak[side.name] = max(peak.get(side.name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    tokens_per_step = case.batch * case.cfg.seq_len
    flops = model_flops_per_token(case.cfg, hand) * tokens_per_step
    out = {"case": case.name, "config": asdict(case.cfg), "batch": case.batch, "compiled": compiled,
           "steps": steps, "warmup": warmup, "sides": {}}
    for side in sides:
        t = statistics.median(side.times)
        out["sides"][side.name] = {
            "median_step_s": t, "tokens_per_s": tokens_per_step / t, "tflops": flops / t / 1e12,
            "mfu": flops / t / H100_BF16_PEAK, "peak_memory_gib": peak.get(side.name),
            "first_loss": losses[side.name][0], "last_loss": losses[side.name][-1],
        }
    hand_t = out["sides"]["hand-written"]["median_step_s"]
    out["wrapped_over_hand_throughput"] = hand_t / out["sides"]["galvatron.wrap"]["median_step_s"]
    return out


def markdown(results: list[dict], command: str, env: dict) -> str:
    lines = [f"Command: `{command}`", "", f"Environment: {json.dumps(env)}", "",
             "| case | compiled | side | step (ms) | tokens/s | TFLOP/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, s in r["sides"].items():
            mem = f"{s['peak_memory_gib']:.1f}" if s["peak_memory_gib"] is not None else "-"
            lines.append(f"| {r['case']} | {r['compiled']} | {name} | {s['median_step_s'] * 1e3:.1f} | "
                         f"{s['tokens_per_s']:.0f} | {s['tflops']:.1f} | {s['mfu']:.1%} | {mem} |")
        lines.append(f"| {r['case']} | {r['compiled']} | **wrapped / hand** | "
                     f"**{r['wrapped_over_hand_throughput']:.3f}** | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="gpt-1.4b,gpt-2b", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--compile", choices=["eager", "compiled", "both"], default="both")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, 2 steps: checks the script")
    parser.add_argument("--out", help="JSON path; a .md table is written beside it")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.cases, args.steps, args.warmup = "smoke", 2, 1
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    modes = {"eager": [False], "compiled": [True], "both": [False, True]}[args.compile]
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "cuda": torch.version.cuda}
    command = " ".join(["python", *sys.argv])
    results = []
    for name in args.cases.split(","):
        for compiled in modes:
            result = run_case(CASES[name], compiled, args.steps, args.warmup, device)
            print(json.dumps(result), flush=True)
            results.append(result)
            if args.out:  # after every case: a run stopped by a time limit keeps what it measured
                with open(args.out, "w") as f:
                    json.dump({"command": command, "env": env, "results": results}, f, indent=2)
                with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
                    f.write(markdown(results, command, env))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(markdown(results, command, env))

if __name__ == "__main__":
    main()
