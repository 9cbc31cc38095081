"""Train the reference GPT in two phases, the second with twice the global batch, switching plans in
the middle of the run through a checkpoint (``galvatron.launch.adapt.replan``):

    galvatron launch --workers 4 --checkpoint-dir ckpt examples/phases_gpt.py --steps 100 --switch-at 50

Each phase runs the plan the search picks for it; parameters and optimizer state cross over.
"""

from __future__ import annotations

import argparse
import os

import torch
from galvatron.launch.adapt import Phase, on_rank0, replan
from galvatron.launch.demo import TrainConfig, global_batch, gpt_config, lm_loss
from galvatron.launch.launcher import CPU_FIXED, ENV_CHECKPOINT_DIR, local_cpu_cluster, search_plan
from galvatron.launch.metrics import StepMeter

import galvatron
from galvatron.models.gpt import GPT
from galvatron.runtime.apply import init_distributed
from galvatron.spec import ModelSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt-demo")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--switch-at", type=int, default=50)
    parser.add_argument("--global-batch", type=int, default=8, help="first phase; the second doubles it")
    args = parser.parse_args()
    cfg, spec = gpt_config(args.model), ModelSpec.from_config(args.model)

    def model_fn() -> torch.nn.Module:
        torch.manual_seed(0)
        return GPT(cfg)

    init_distributed()
    world = torch.distributed.get_world_size()
    first = on_rank0(lambda: search_plan(spec, world, cluster=local_cpu_cluster(world),
                                         global_batch=args.global_batch, fixed=CPU_FIXED))
    model = galvatron.wrap(model_fn(), plan=first.plan)
    optimizer = model.optimizer(torch.optim.AdamW, lr=1e-3)
    checkpoint_dir = os.environ.get(ENV_CHECKPOINT_DIR, "checkpoints")  # one folder for all ranks
    for phase, batch in enumerate((args.global_batch, 2 * args.global_batch)):
        if phase == 1:
            new = replan(model, optimizer, Phase(global_batch=batch), step=args.switch_at, model_fn=model_fn,
                         checkpoint_dir=checkpoint_dir, spec=spec)
            model, optimizer = new.model, new.optimizer
        steps = range(args.switch_at) if phase == 0 else range(args.switch_at, args.steps)
        meter = StepMeter(tokens_per_step=batch * cfg.seq_len, flops_per_token=spec.flops_per_token(),
                          total_steps=args.steps, plan=model.plan, every=10)
        for step in steps:
            inputs, targets = global_batch(step, TrainConfig(model=args.model, global_batch=batch), cfg)
            loss = model.train_step(model.shard_batch((inputs, targets)), lm_loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            meter.step(step, loss)
    torch.distributed.destroy_process_group()  # a gloo group left alive can abort the interpreter's exit


if __name__ == "__main__":
    main()
