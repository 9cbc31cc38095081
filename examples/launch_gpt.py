"""Train the reference GPT on the workers ``galvatron launch`` starts (torchrun or Ray).

    galvatron launch --workers 4 --search --model gpt-demo examples/launch_gpt.py --steps 200
    galvatron launch --ray --workers 4 --plan plan.yaml --checkpoint-dir ckpt --checkpoint-interval 50 \\
        --max-restarts 3 examples/launch_gpt.py --steps 200

Everything the launcher decides reaches the script through ``GALVATRON_*`` variables: the plan
file, the checkpoint folder and interval, the predicted step time and the device peak for MFU.
After a restart (a lost worker, another worker count) the script resumes from the newest
checkpoint, resharded to the plan it runs now.
"""

from __future__ import annotations

import argparse
import json

import torch
from galvatron.launch.checkpoints import Checkpointer
from galvatron.launch.demo import TrainConfig, global_batch, gpt_config, lm_loss
from galvatron.launch.metrics import StepMeter

import galvatron
from galvatron.models.gpt import GPT
from galvatron.spec import ModelSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt-demo")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", help="rank 0 writes the losses and the plan it ran here (JSON)")
    args = parser.parse_args()
    data = TrainConfig(model=args.model, global_batch=args.global_batch)
    cfg = gpt_config(args.model)

    torch.manual_seed(0)
    model = galvatron.wrap(GPT(cfg))  # the plan in $GALVATRON_PLAN, or the search's
    optimizer = model.optimizer(torch.optim.AdamW, lr=args.lr)
    checkpointer = Checkpointer.from_env()  # None unless launched with --checkpoint-dir
    start = checkpointer.resume(model, optimizer) if checkpointer else 0
    meter = StepMeter(tokens_per_step=args.global_batch * cfg.seq_len, plan=model.plan, total_steps=args.steps,
                      flops_per_token=ModelSpec.from_config(args.model).flops_per_token())
    losses = []
    for step in range(start, args.steps):
        inputs, targets = global_batch(step, data, cfg)
        loss = model.train_step(model.shard_batch((inputs, targets)), lm_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.step(step, loss)
        losses.append(float(loss))
        if checkpointer:
            checkpointer.maybe_save(step + 1, model, optimizer)
    if args.out and torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"start": start, "losses": losses, "plan": model.plan.to_dict(),
                       "world": torch.distributed.get_world_size()}, f)
    # before the interpreter exits: a gloo group left alive can abort it there (SIGABRT)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
