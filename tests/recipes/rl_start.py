"""The starting point of the RL recipes: a tiny model briefly fine-tuned (SFT) to answer the quickstart task with
digits, trained once per test session and shared by test_grpo.py and test_ppo.py.

Its sampled answers start with any digit; the RL tests reward answers whose first digit is 1-4 (about half of
them at the start), which a policy can learn within a few steps and a test can measure.
"""

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dsft.cli import app

from .conftest import QUICKSTART

LOW_FIRST_DIGIT = {"kind": "regex", "pattern": "^[1-4]", "name": "low_first_digit"}
"""The reward of the RL recipes: 1 when the answer starts with a digit from 1 to 4."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread while the RL recipes run: on models this small thread synchronization costs more
    than the matrix products, and a shared 2-core machine is not oversubscribed (measured: PPO's recipe takes
    a fifth of the time it takes on two threads next to another job)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompts_file(root: Path) -> Path:
    """The first 64 quickstart training records (alpaca: instruction and output)."""
    path = root / "prompts.jsonl"
    if not path.is_file():
        lines = (QUICKSTART / "train.jsonl").read_text(encoding="utf-8").splitlines()[:64]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sft_start(tmp_path_factory) -> Path:
    """The run directory of the SFT start (full fine-tuning of tiny-qwen2, 40 steps), trained on first use."""
    root = tmp_path_factory.getbasetemp() / "rl-start"
    run_dir = root / "sft"
    if (run_dir / "summary.json").is_file():
        return run_dir
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "model": {"preset": "tiny-qwen2"},
        "data": {"train_files": [str(prompts_file(root))], "max_length_tokens": 64},
        "method": {"type": "full"},
        "train": {"learning_rate": 3e-3, "max_steps": 40, "batch_size": 16, "lr_warmup_steps": 5, "logging_steps": 10,
                  "seed": 0, "tensorboard": False},
        "output": {"dir": str(run_dir)},
    }
    path = root / "sft.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return run_dir


def rl_config(tmp_path: Path, start: Path, prompts: Path, stage: str, **sections) -> Path:
    """A config of stage (grpo or ppo) from the SFT start on the prompts, sections merged in; written to tmp_path."""
    config = {
        "stage": stage,
        "model": {"name_or_path": str(start)},
        "data": {"train_files": [str(prompts)], "max_length_tokens": 64},
        "method": {"type": "full"},
        "train": {"learning_rate": 1e-3, "max_steps": 16, "batch_size": 32, "logging_steps": 1, "seed": 0,
                  "lr_scheduler": "constant", "tensorboard": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        config[section] = values if section == "method" else {**config.get(section, {}), **values}
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path
