"""Run a training script on several workers, under torchrun or on Ray, with a plan.

    galvatron launch --workers 4 train.py --lr 3e-4                      # torchrun, one node
    galvatron launch --ray --workers 8 --gpu --plan plan.yaml train.py   # Ray, one actor per GPU
    galvatron launch --ray --workers 4 --search --model gpt-demo train.py

The plan comes from ``--plan FILE``, from ``--search`` before start (for ``--model`` on
``--cluster``, or on this machine's CPUs), or, with neither, from ``wrap(plan="auto")`` inside the
workers. It reaches them as the file named by ``GALVATRON_PLAN``; ``--checkpoint-dir`` and
``--checkpoint-interval`` reach them as ``GALVATRON_CHECKPOINT_DIR`` and
``GALVATRON_CHECKPOINT_INTERVAL``. Lost workers are restarted up to ``--max-restarts`` times and
resume from the newest checkpoint; on Ray, ``--min-workers`` lets a restart continue with fewer
workers under a re-searched plan (needs ``--search``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from galvatron.launch.launcher import (
    CPU_FIXED,
    ENV_PLAN,
    PlanChoice,
    cpu_peak_flops,
    local_cpu_cluster,
    local_cpu_perf,
    plan_from_file,
    say,
    search_plan,
    worker_env,
)

from galvatron.errors import ConfigError
from galvatron.spec import ModelSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--torchrun", action="store_true", help="run under torchrun (the default)")
    where.add_argument("--ray", action="store_true", help="run on Ray: one actor per worker in a placement group")
    parser.add_argument("--workers", type=int, required=True, help="workers per node (torchrun) or in all (Ray)")
    parser.add_argument("--gpu", action="store_true", help="Ray: one GPU per worker (NCCL); default one CPU (gloo)")
    plan = parser.add_mutually_exclusive_group()
    plan.add_argument("--plan", metavar="FILE", help="plan YAML every worker runs")
    plan.add_argument("--search", action="store_true", help="search the plan before start (needs --model)")
    parser.add_argument("--model", help="--search: model preset or YAML")
    parser.add_argument("--cluster", help="--search: cluster preset or YAML (default: this machine's CPUs)")
    parser.add_argument("--global-batch", type=int, help="--search: sequences per step")
    parser.add_argument("--model-profile", metavar="FILE",
                        help="--search --cluster: per-layer times (`galvatron profile model`) for the datasheet's")
    parser.add_argument("--cluster-profile", metavar="FILE",
                        help="--search --cluster: collectives (`galvatron profile cluster`) for the datasheet's")
    parser.add_argument("--checkpoint-dir", help="checkpoint folder the workers save to and resume from")
    parser.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints")
    parser.add_argument("--max-restarts", type=int, default=0, help="restarts after lost workers (default 0)")
    parser.add_argument("--min-workers", type=int, help="Ray: fewest workers a restart may continue with")
    parser.add_argument("--ray-address", help="Ray: cluster to join ('auto': the running one); default a local Ray")
    multi = parser.add_argument_group("torchrun on several nodes (passed through)")
    multi.add_argument("--nnodes", default="1")
    multi.add_argument("--node-rank", type=int)
    multi.add_argument("--master-addr")
    multi.add_argument("--master-port", type=int)
    multi.add_argument("--rdzv-backend")
    multi.add_argument("--rdzv-endpoint")
    multi.add_argument("--rdzv-id")
    parser.add_argument("script", help="training script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")


def run(args: argparse.Namespace) -> int:
    world = args.workers * (int(args.nnodes) if args.nnodes.isdigit() else 1)
    choice, spec = _plan(args, world)
    if choice is not None:
        say(choice.describe())
    peak = None if args.gpu or args.cluster else cpu_peak_flops(args.workers)
    env = worker_env(choice, peak_flops=peak, checkpoint_dir=args.checkpoint_dir,
                     checkpoint_interval=args.checkpoint_interval)
    if args.ray:
        return _run_ray(args, choice, spec, env)
    with tempfile.TemporaryDirectory(prefix="galvatron-launch-") as tmp:
        if choice is not None:
            choice.plan.save(Path(tmp) / "plan.yaml")
            env[ENV_PLAN] = str(Path(tmp) / "plan.yaml")
        return _run_torchrun(args, env)


def _plan(args: argparse.Namespace, world: int) -> tuple[PlanChoice | None, ModelSpec | None]:
    if args.search and not args.model:
        raise ConfigError("--search needs --model (a preset name or a model YAML)")
    spec = ModelSpec.from_config(args.model) if args.model else None
    if args.plan:
        return plan_from_file(args.plan, world, spec), spec
    if not args.search:
        return None, spec
    return search_plan(spec, world, **_search_target(args, world)), spec


def _search_target(args: argparse.Namespace, world: int) -> dict:
    """Where and how to search: on ``--cluster``, or on CPU workers: as profiled here (the model, and
    gloo among ``world`` local processes) when the workers run on this machine, else nominal."""
    target = {"global_batch": args.global_batch}
    if args.cluster:
        from galvatron.strategies.hardware import load_cluster

        cluster = load_cluster(args.cluster)
        if args.model_profile or args.cluster_profile:
            from galvatron.launch.cmd_simulate import apply_profiles

            apply_profiles(args, ModelSpec.from_config(args.model), cluster)
            cluster = args.perf
        return {**target, "cluster": cluster}
    if args.model_profile or args.cluster_profile:
        raise ConfigError("--model-profile / --cluster-profile go with --cluster (on this machine's CPUs the "
                          "launcher profiles the model and gloo itself)")
    if args.nnodes != "1" or args.ray_address:  # workers on other machines: this one cannot measure them
        return {**target, "cluster": local_cpu_cluster(world), "fixed": CPU_FIXED}
    return {**target, "cluster": local_cpu_perf(ModelSpec.from_config(args.model), world, model=args.model),
            "fixed": CPU_FIXED}


def _run_ray(args: argparse.Namespace, choice: PlanChoice | None, spec: ModelSpec | None, env: dict) -> int:
    from galvatron.launch.ray_launcher import RayConfig, RayLauncher

    replan = None
    if args.search and args.min_workers:
        replan = lambda world: search_plan(spec, world, **_search_target(args, world)).plan
    config = RayConfig(workers=args.workers, use_gpu=args.gpu, plan=choice.plan if choice else None, env=env,
                       max_restarts=args.max_restarts, min_workers=args.min_workers, replan=replan,
                       address=args.ray_address)
    codes = RayLauncher(config).run_script(args.script, args.script_args)
    return max(codes, key=abs)


def _run_torchrun(args: argparse.Namespace, env: dict) -> int:
    from galvatron.launch.torchrun_launcher import TorchrunConfig, run_torchrun

    config = TorchrunConfig(nproc_per_node=args.workers, nnodes=args.nnodes, node_rank=args.node_rank,
                            master_addr=args.master_addr, master_port=args.master_port,
                            rdzv_backend=args.rdzv_backend, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                            max_restarts=args.max_restarts)
    return run_torchrun(config, args.script, args.script_args, env)
