"""Run a training script under ``torchrun`` (``python -m torch.distributed.run``).

One node: static rendezvous on 127.0.0.1 and a free port, gloo bound to the loopback device
unless ``GLOO_SOCKET_IFNAME`` is set. Several nodes: run the same ``galvatron launch --torchrun``
on every node with torchrun's own arguments (``--nnodes``, ``--node-rank`` with
``--master-addr``/``--master-port``, or ``--rdzv-endpoint``/``--rdzv-id`` for the c10d
rendezvous); they are passed through unchanged. ``--max-restarts`` is torchrun's: it restarts
every worker of the node group, and the script resumes from its newest checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from galvatron.launch.launcher import free_port

from galvatron.errors import ConfigError

_LOCAL_IP = "127.0.0.1"


@dataclass(frozen=True, kw_only=True)
class TorchrunConfig:
    """torchrun's arguments, as ``galvatron launch --torchrun`` takes them."""

    nproc_per_node: int
    nnodes: str = "1"
    """Nodes, or ``MIN:MAX`` for an elastic job (c10d rendezvous)."""
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_backend: str | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    max_restarts: int = 0

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ConfigError(f"workers per node must be at least 1, got {self.nproc_per_node}")

    @property
    def single_node(self) -> bool:
        return self.nnodes == "1" and self.rdzv_endpoint is None and self.master_addr is None


def torchrun_command(config: TorchrunConfig, script: str, script_args: Sequence[str] = ()) -> list[str]:
    """The ``python -m torch.distributed.run ... script args`` command line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={config.nproc_per_node}",
           f"--nnodes={config.nnodes}", f"--max-restarts={config.max_restarts}"]
    if config.single_node:
        cmd += [f"--master-addr={_LOCAL_IP}", f"--master-port={config.master_port or free_port()}"]
    else:
        for flag, value in (("--node-rank", config.node_rank), ("--master-addr", config.master_addr),
                            ("--master-port", config.master_port), ("--rdzv-backend", config.rdzv_backend),
                            ("--rdzv-endpoint", config.rdzv_endpoint), ("--rdzv-id", config.rdzv_id)):
            if value is not None:
                cmd.append(f"{flag}={value}")
    return [*cmd, script, *script_args]


def run_torchrun(config: TorchrunConfig, script: str, script_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None) -> int:
    """Run the script under torchrun with ``env`` added to the environment; returns torchrun's exit code."""
    full_env = {**os.environ, **(env or {})}
    if config.single_node:
        full_env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return subprocess.run(torchrun_command(config, script, script_args), env=full_env, check=False).returncode
