"""dsft train --nproc N: start N worker processes per node through torch.distributed.run and name a failed rank.

Each worker runs `python -m dsft.cli train CONFIG ...` (the same command without the launch flags) with RANK,
WORLD_SIZE and the rendezvous in its environment; the engine (train.distributed) is applied inside the worker
(distributed.py). torch.distributed.run stops every worker when one fails; dsft then names the rank that failed
first, from the error file each worker writes (distributed.report_failure).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dsft.errors import DsftError
from dsft.train.distributed import ERROR_DIR_ENV


@dataclass(frozen=True)
class Topology:
    """Where the workers run: nproc_per_node processes on each of nnodes machines."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def launches(self) -> bool:
        """More than one process in all: go through the launcher (a worker never launches again)."""
        return self.nproc_per_node * self.nnodes > 1 and "RANK" not in os.environ


def torchrun_command(topology: Topology, worker_args: list[str]) -> list[str]:
    """The torch.distributed.run command line that starts this node's workers on `dsft.cli` worker_args.

    Raises DsftError for an impossible topology."""
    if topology.nproc_per_node < 1 or topology.nnodes < 1 or not 0 <= topology.node_rank < topology.nnodes:
        raise DsftError(f"--nproc must be >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes (got {topology})")
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={topology.nproc_per_node}", f"--nnodes={topology.nnodes}",
        f"--node-rank={topology.node_rank}", f"--master-addr={topology.master_addr}",
        f"--master-port={topology.master_port}",
        "-m", "dsft.cli", *worker_args,
    ]


SINGLE_PROCESS_STAGES = ("ppo",)
"""Stages with dsft's own training loop (no Trainer, so no engine to share the work): one process only."""


def launch(topology: Topology, worker_args: list[str], stages: list[str]) -> None:
    """Run this node's workers to the end; stages are the run's training stages, in order.

    Raises DsftError for a stage that runs in one process only, or naming the failed rank(s) when any worker fails."""
    for stage in stages:
        if stage in SINGLE_PROCESS_STAGES:
            raise DsftError(f"stage {stage} runs in one process (its loop has no distributed engine); "
                            "drop --nproc/--nnodes for it")
    with tempfile.TemporaryDirectory(prefix="dsft-ranks-") as error_dir:
        env = {**os.environ, ERROR_DIR_ENV: error_dir}
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, said here so it is not a surprise
        returncode = _run_forwarding_sigterm(torchrun_command(topology, worker_args), env)
        if returncode != 0:
            message = _failure_message(Path(error_dir), returncode)
            raise DsftError(_with_resume_command(message, topology, worker_args))


def _run_forwarding_sigterm(command: list[str], env: dict) -> int:
    """Run the launcher and wait; a SIGTERM to dsft (a scheduler's preemption) goes on to it, so the workers save a
    checkpoint and stop instead of training on as orphans. Ctrl-C reaches them from the terminal directly."""
    child = subprocess.Popen(command, env=env)
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum)),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
    }
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _failure_message(error_dir: Path, returncode: int) -> str:
    reports = sorted(error_dir.glob("rank-*.txt"), key=lambda path: path.stat().st_mtime)
    if not reports:
        return f"distributed training failed (exit status {returncode}); see the workers' output above for the rank"
    first = reports[0].read_text(encoding="utf-8").strip()
    return f"distributed training stopped: {first}" + (f" ({len(reports)} ranks failed)" if len(reports) > 1 else "")


RESUME_MARK = "Resume with: "


def _with_resume_command(message: str, topology: Topology, worker_args: list[str]) -> str:
    """A worker stopped by a signal says how to resume as one process; say it with this launch's flags instead."""
    if RESUME_MARK not in message:
        return message
    flags = [f"--nproc={topology.nproc_per_node}"]
    if topology.nnodes > 1:
        flags += [f"--nnodes={topology.nnodes}", f"--node-rank={topology.node_rank}",
                  f"--master-addr={topology.master_addr}", f"--master-port={topology.master_port}"]
    args = [arg for arg in worker_args if arg != "--resume"]
    return message.split(RESUME_MARK)[0] + RESUME_MARK + shlex.join(["dsft", *args, *flags, "--resume"])
