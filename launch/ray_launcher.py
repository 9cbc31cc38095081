"""Run a training function or script on Ray: one actor per worker, gathered in a placement group.

Each actor gets the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) plus the ``GALVATRON_*`` variables, so the same script runs
under ``torchrun`` and here; it joins the process group itself (``init_distributed()``: NCCL on
GPUs, one GPU per actor; gloo on CPUs). Plain actors rather than Ray Train's ``TorchTrainer``:
startup is one actor per worker and nothing else (a trainer adds a controller and its own
checkpoint manager), and the restart policy below stays ours and small.

Fault tolerance: when a worker process dies (killed, crashed, its node lost), every actor is
stopped, a new set is started and the training code resumes from its newest checkpoint
(``GALVATRON_RESTART`` says which attempt it is). With ``min_workers`` below ``workers`` a
restart that cannot place every worker within ``placement_timeout_s`` goes on with fewer, and
``replan(world_size)`` supplies the plan for the new count. An exception raised by the training
code itself is not retried: it is raised with the worker's traceback.
"""

from __future__ import annotations

import math
import os
import runpy
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galvatron.launch.launcher import ENV_PLAN, ENV_RESTART, LaunchError, free_port, say

from galvatron.errors import ConfigError
from galvatron.plan import Plan

_LOCAL_IP = "127.0.0.1"
_LOG_DRAIN_S = 1.5
"""Ray forwards worker output to the driver by polling log files: wait this long before shutting
down a Ray we started, or the workers' last lines are lost."""


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """How many workers to start on Ray, and how to recover when one is lost."""

    workers: int
    """Workers (ranks) to start: one per GPU with ``use_gpu``, else one per ``cpus_per_worker`` CPUs."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    plan: Plan | None = None
    """The plan every worker runs, written to a file on each worker's node and named in
    ``GALVATRON_PLAN``; None: the workers find their own (``wrap(plan="auto")``)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """More environment variables for the workers."""
    max_restarts: int = 3
    """Restarts after lost workers before the run fails."""
    min_workers: int | None = None
    """Fewest workers a restart may continue with (None: exactly ``workers``)."""
    replan: Callable[[int], Plan] | None = None
    """Plan for a new worker count, called when a restart continues with fewer workers."""
    placement_timeout_s: float = 120.0
    address: str | None = None
    """Ray cluster to join (``"auto"``: the running one); None: start a local Ray bound to 127.0.0.1."""
    runtime_env: Mapping[str, Any] | None = None
    """Ray runtime environment of the workers (e.g. ``working_dir`` on a multi-node cluster)."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.workers:
            raise ConfigError(f"min_workers must be between 1 and workers={self.workers}, got {self.min_workers}")


def ensure_ray(config: RayConfig) -> bool:
    """Join ``config.address``, or start a local Ray bound to 127.0.0.1 with room for every worker;
    returns True when this call started Ray (and so should shut it down)."""
    if config.address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read once, when ray is imported
        os.environ.setdefault("RAY_worker_niceness", "0")  # training workers are the job, not background work
    import ray

    if ray.is_initialized():
        return False
    runtime_env = dict(config.runtime_env) if config.runtime_env else None
    if config.address is not None:
        ray.init(address=config.address, runtime_env=runtime_env)
        return True
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise LaunchError("a local Ray binds to 127.0.0.1 only when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set "
                          "before ray is first imported; set it, or start Ray yourself and pass its address")
    cpus = max(os.cpu_count() or 1, math.ceil(config.workers * config.cpus_per_worker))
    ray.init(_node_ip_address=_LOCAL_IP, include_dashboard=False, num_cpus=cpus, runtime_env=runtime_env)
    return True


class Worker:
    """One rank, as a Ray actor: holds its environment and runs the training code."""

    def __init__(self, rank: int, env: Mapping[str, str], plan_yaml: str | None, cwd: str) -> None:
        self.rank = rank
        os.environ.update(env)
        if plan_yaml is not None:
            path = Path(os.environ.get("TMPDIR", "/tmp")) / f"galvatron-plan-{os.getpid()}.yaml"
            path.write_text(plan_yaml)
            os.environ[ENV_PLAN] = str(path)
        if os.path.isdir(cwd):
            os.chdir(cwd)

    def __repr__(self) -> str:  # Ray prefixes the worker's output with this
        return f"rank {self.rank}"

    def node_ip(self) -> str:
        """The address of this worker's node."""
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self, host: str) -> int:
        """A free port on ``host`` here (asked of rank 0, which hosts the rendezvous)."""
        return free_port(host)

    def run(self, env: Mapping[str, str], fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Set the rank's torchrun variables and call ``fn``; leaves no process group behind."""
        os.environ.update(env)
        try:
            return fn(*args, **kwargs)
        finally:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def run_script(script: str, argv: Sequence[str]) -> int:
    """Run a Python script as ``__main__`` with ``argv``, as ``python script argv...`` would; returns
    its exit code."""
    path = os.path.abspath(script)
    sys.argv = [path, *argv]
    sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print(done.code, file=sys.stderr)
        return 1
    return 0


class WorkerLost(LaunchError):
    """A worker process died (not an error in the training code)."""


class RayLauncher:
    """Start the workers of :class:`RayConfig` and run training code on all of them.

    ``run(fn, *args)`` returns ``fn``'s results by rank; ``run_script(path, argv)`` the exit codes.
    """

    def __init__(self, config: RayConfig) -> None:
        self.config = config
        self.restarts = 0
        self.world_size = config.workers
        self.plan = config.plan
        self._actors: list[Any] = []
        self._pg: Any = None

    def run_script(self, script: str, argv: Sequence[str] = ()) -> list[int]:
        """Run ``script`` with ``argv`` on every worker; returns the exit codes by rank."""
        return self.run(run_script, os.path.abspath(script), list(argv))

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every worker, restarting lost workers up to ``max_restarts``."""
        owns_ray = ensure_ray(self.config)
        try:
            return self._run(fn, args, kwargs)
        finally:
            if owns_ray:
                import ray

                time.sleep(_LOG_DRAIN_S)
                ray.shutdown()

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> list[Any]:
        while True:
            try:
                return self._attempt(fn, args, kwargs)
            except WorkerLost as lost:
                if self.restarts >= self.config.max_restarts:
                    raise LaunchError(f"{lost}; gave up after {self.restarts} restart(s)") from None
                self.restarts += 1
                say(f"galvatron: {lost}; restart {self.restarts}/{self.config.max_restarts} "
                    "from the latest checkpoint")
            finally:
                self._stop()

    def kill_worker(self, rank: int) -> None:
        """Kill one worker's process, as a crash would (for fault-tolerance drills and tests)."""
        import ray

        ray.kill(self._actors[rank], no_restart=True)

    # ---------------------------------------------------------------- one attempt
    def _attempt(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> list[Any]:
        import ray

        self._place()
        env = {**self.config.env, ENV_RESTART: str(self.restarts)}
        plan_yaml = self.plan.to_yaml() if self.plan is not None else None
        worker_cls = ray.remote(num_cpus=0 if self.config.use_gpu else self.config.cpus_per_worker,
                                num_gpus=1 if self.config.use_gpu else 0)(Worker)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._actors = [
            worker_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, i)).remote(
                i, env, plan_yaml, os.getcwd())
            for i in range(self.world_size)
        ]
        ranks_env = self._rank_env()
        futures = [a.run.remote(e, fn, args, kwargs) for a, e in zip(self._actors, ranks_env)]
        return self._wait(futures)

    def _place(self) -> None:
        """Reserve the workers' resources; on a restart with ``min_workers``, as many as can be had."""
        from ray.util.placement_group import placement_group

        bundle = {"GPU": 1, "CPU": 0} if self.config.use_gpu else {"CPU": self.config.cpus_per_worker}
        floor = self.config.min_workers or self.config.workers
        world = self.config.workers
        while True:
            self._pg = placement_group([bundle] * world, strategy="PACK")
            if self._pg_ready(self.config.placement_timeout_s if world == floor else 5.0):
                break
            self._remove_pg()
            if world == floor:
                raise LaunchError(f"could not place {world} worker(s) of {bundle} within "
                                  f"{self.config.placement_timeout_s:.0f} s")
            world -= 1
        if world != self.world_size:
            self._resize(world)

    def _pg_ready(self, timeout: float) -> bool:
        import ray

        ready, _ = ray.wait([self._pg.ready()], timeout=timeout)
        return bool(ready)

    def _resize(self, world: int) -> None:
        if self.config.replan is None:
            raise LaunchError(f"only {world} of {self.world_size} workers can be placed and no replan is given")
        say(f"galvatron: continuing with {world} worker(s) instead of {self.world_size}; re-planning")
        self.plan = self.config.replan(world)
        say(self.plan.describe())
        self.world_size = world

    def _rank_env(self) -> list[dict[str, str]]:
        """torchrun's variables per rank; on one node the group talks over the loopback device only."""
        import ray

        nodes = ray.get([a.node_ip.remote() for a in self._actors])
        order = list(dict.fromkeys(nodes))
        master = _LOCAL_IP if len(order) == 1 else nodes[0]
        port = ray.get(self._actors[0].free_port.remote(master))
        envs = []
        for rank, ip in enumerate(nodes):
            same = [r for r, other in enumerate(nodes) if other == ip]
            env = {"RANK": str(rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(same.index(rank)),
                   "LOCAL_WORLD_SIZE": str(len(same)), "GROUP_RANK": str(order.index(ip)),
                   "MASTER_ADDR": master, "MASTER_PORT": str(port)}
            if len(order) == 1 and "GLOO_SOCKET_IFNAME" not in self.config.env:
                env["GLOO_SOCKET_IFNAME"] = "lo"
            envs.append(env)
        return envs

    def _wait(self, futures: list[Any], grace_s: float = 10.0) -> list[Any]:
        """Results by rank; on the first failure, give the others ``grace_s`` to fail too and tell a lost
        worker (restart) from an error in the training code (raise)."""
        import ray

        index = {f: i for i, f in enumerate(futures)}
        results: dict[int, Any] = {}
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                results[index[done[0]]] = ray.get(done[0])
            except ray.exceptions.RayError as first:
                failures = {index[done[0]]: first}
                finished, _ = ray.wait(pending, num_returns=len(pending), timeout=grace_s)
                for f in finished:
                    try:
                        ray.get(f)
                    except ray.exceptions.RayError as err:
                        failures[index[f]] = err
                raise _classify(failures) from None
        return [results[r] for r in range(len(futures))]

    def _stop(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
        self._remove_pg()

    def _remove_pg(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None


def _classify(failures: dict[int, Exception]) -> LaunchError:
    """A lost worker when any worker process died; else the training code's first error."""
    from ray import exceptions as rex

    died = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.OutOfMemoryError)
    lost = {r: e for r, e in failures.items() if isinstance(e, died)}
    if lost:
        ranks = ", ".join(str(r) for r in sorted(lost))
        return WorkerLost(f"worker(s) {ranks} lost ({type(next(iter(lost.values()))).__name__})")
    rank = min(failures)
    return LaunchError(f"rank {rank} failed:\n{failures[rank]}")
