"""Fault tests: real processes, real signals, real files; shared launching and inspection helpers."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.recipes.conftest import make_config, read_metrics, tiny_data  # noqa: F401  (tiny_data is a fixture)

# Loaded by a child Python at start-up (sitecustomize), it makes the Nth torch.save call of that
# process fail the way a real fault would: SIGKILL mid-save, or a full disk. Nothing of dsft is patched.
_FAULT_INJECTOR = textwrap.dedent(
    """
    import errno, os, signal
    import torch

    _real_save, _calls = torch.save, [0]

    def _faulty_save(*args, **kwargs):
        _calls[0] += 1
        if _calls[0] == int(os.environ["DSFT_FAULT_AT_SAVE"]):
            if os.environ["DSFT_FAULT"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))
        return _real_save(*args, **kwargs)

    torch.save = _faulty_save
    """
)


def dsft_command(*args) -> list[str]:
    return [sys.executable, "-m", "dsft.cli", *map(str, args)]


def run_dsft(*args, env: dict | None = None, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(dsft_command(*args), capture_output=True, text=True, env=env, timeout=timeout_s)


def fault_env(tmp_path: Path, fault: str, at_save_call: int) -> dict:
    """Environment for a child process whose at_save_call-th torch.save fails with fault (kill | enospc)."""
    injector_dir = tmp_path / "injector"
    injector_dir.mkdir(exist_ok=True)
    (injector_dir / "sitecustomize.py").write_text(_FAULT_INJECTOR, encoding="utf-8")
    pythonpath = os.pathsep.join([str(injector_dir), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": pythonpath, "DSFT_FAULT": fault, "DSFT_FAULT_AT_SAVE": str(at_save_call)}


def wait_for(condition, timeout_s: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def weights(run_dir: Path, name: str = "model.safetensors") -> dict:
    return load_file(str(run_dir / name))


def per_step(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r and "loss" in r}


def ledger(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
