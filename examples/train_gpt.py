"""Train the reference GPT under the plan galvatron finds for the live world: the same script on
CPU processes (gloo) and on GPUs (NCCL).

    torchrun --nproc-per-node 4 examples/train_gpt.py              # 4 CPU processes, or 4 GPUs
    torchrun --nproc-per-node 4 examples/train_gpt.py --plan configs/plans/my-plan.yaml

The data is synthetic but learnable (each sequence counts up from a random start with a random
stride), so the loss falls quickly; the script exits with status 1 if it does not.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

import galvatron
from galvatron.models import GPT, GPTConfig


def batch(step: int, size: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One global batch of (inputs, next-token targets), the same on every rank."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, vocab, (size, 1), generator=g)
    stride = torch.randint(1, 4, (size, 1), generator=g)
    tokens = (start + stride * torch.arange(seq + 1)) % vocab
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default="auto", help="a plan YAML, or auto (search; default)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences per step)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = GPTConfig(vocab=128, seq_len=args.seq, layers=args.layers, hidden=args.hidden, heads=4)
    example = batch(0, args.batch, args.seq, cfg.vocab)[0]
    model = galvatron.wrap(GPT(cfg), plan=args.plan, example_batch=example)
    rank = dist.get_rank()
    if rank == 0:
        print(model.plan.describe(), flush=True)
    device = next(model.parameters()).device
    optimizer = model.optimizer(torch.optim.AdamW, lr=args.lr)
    losses = []
    for step in range(args.steps):
        inputs, targets = (t.to(device) for t in batch(step, args.batch, args.seq, cfg.vocab))
        loss = model.train_step(model.shard_batch((inputs, targets)), loss_fn)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {losses[-1]:.4f}", flush=True)
    window = max(1, args.steps // 5)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    decreased = last < first
    if rank == 0:
        print(f"loss {first:.4f} -> {last:.4f}: {'decreasing' if decreased else 'NOT decreasing'}", flush=True)
    dist.destroy_process_group()
    return 0 if decreased else 1


if __name__ == "__main__":
    raise SystemExit(main())
