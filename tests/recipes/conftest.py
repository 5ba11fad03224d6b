"""Shared pieces of the end-to-end recipes: tiny data and configs in a temporary directory."""

import json
from pathlib import Path

import pytest
import yaml

QUICKSTART = Path(__file__).parents[2] / "examples" / "data" / "quickstart"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """64 training and 8 held-out records of the quickstart task, as alpaca jsonl files."""
    root = tmp_path_factory.mktemp("data")
    files = {}
    for name, count in (("train", 64), ("test", 8)):
        lines = (QUICKSTART / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def make_config(tmp_path: Path, tiny_data: dict, **sections) -> Path:
    """A small LoRA run config (sections merged in), written to tmp_path/run.yaml."""
    config = {
        "model": {"preset": "tiny-deepseek-v3"},
        "data": {"train_files": [str(tiny_data["train"])], "max_length_tokens": 64},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 64}},
        "train": {"learning_rate": 3e-3, "max_steps": 12, "batch_size": 8, "logging_steps": 1, "seed": 0, "tensorboard": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        # model and method replace the defaults: their alternatives (preset or path, lora or full) exclude each other.
        config[section] = values if section in ("model", "method") else {**config.get(section, {}), **values}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def logs_with_and_without_packing(tmp_path: Path, monkeypatch, config_for, keys: tuple[str, ...],
                                  announced: str) -> dict:
    """Run `dsft train` on config_for(directory, packing) with train.packing off, then on; per packing, the values of
    keys in each metrics.jsonl record that has them. Checks the packed run announced itself, ran padded batches packed
    through the model body (and the other run none) and says so in summary.json.

    Both runs: this process, the same CPU path, the same samples in the same steps, but sums of other shapes (one
    packed row against padded rows), so the callers compare up to rounding: rtol 1e-4 (1e-3 for GRPO and PPO, whose
    few steps at a high learning rate grow the gap faster), which holds on each CPU path the suite is checked on."""
    from typer.testing import CliRunner

    from dsft.cli import app
    from dsft.models import packed_forward

    logs = {}
    for packing in (False, True):
        directory = tmp_path / f"packing_{packing}"
        directory.mkdir()
        packed_batches = []
        monkeypatch.setattr(packed_forward, "packed_positions", lambda mask, seen=packed_batches,
                            count=packed_forward.packed_positions: seen.append(1) or count(mask))
        result = CliRunner().invoke(app, ["train", str(config_for(directory, packing))], catch_exceptions=False)
        monkeypatch.undo()
        assert result.exit_code == 0, result.output
        assert (announced in result.output) == packing
        assert bool(packed_batches) == packing
        run_dir = next(directory.glob("**/summary.json")).parent
        assert json.loads((run_dir / "summary.json").read_text())["packing"] == packing
        logs[packing] = [tuple(r[k] for k in keys) for r in read_metrics(run_dir) if all(k in r for k in keys)]
    assert logs[True] and len(logs[True]) == len(logs[False])
    return logs
