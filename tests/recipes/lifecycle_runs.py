"""Two tiny runs for the lifecycle recipes: `right` trained to answer every prompt with the test set's reference
("The answer is 42."), `wrong` trained on the same prompts to answer something else. 30 LoRA steps make each say
its answer on every test prompt (exact match 1.0 and 0.0), so a gate between them has a real, known drop. Both
are LoRA runs on one base (same preset, seed and tokenizer): a server holds them side by side."""

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from dsft.cli import app

RIGHT, WRONG = "The answer is 42.", "No idea at all."


def train_lifecycle_runs(root: Path, quickstart_train: Path, tracking_for_right: bool = True) -> dict:
    prompts = [json.loads(line)["instruction"] for line in quickstart_train.read_text(encoding="utf-8").splitlines()]
    files = {}
    for name, answer, chosen in (("right", RIGHT, prompts[:48]), ("wrong", WRONG, prompts[:48]),
                                 ("test", RIGHT, prompts[48:64])):
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"instruction": p, "output": answer}, ensure_ascii=False) + "\n"
                                       for p in chosen), encoding="utf-8")
    runs = {}
    for name in ("right", "wrong"):
        config = {"model": {"preset": "tiny-qwen2"}, "data": {"train_files": [str(files[name])], "max_length_tokens": 64},
                  "method": {"type": "lora", "lora": {"r": 8, "alpha": 16}},
                  "train": {"learning_rate": 3e-3, "max_steps": 30, "batch_size": 8, "logging_steps": 5, "seed": 0,
                            "tensorboard": False},
                  "eval": {"max_new_tokens": 12, "bootstrap_resamples": 200, "metrics": ["exact_match", "f1"]},
                  "output": {"dir": str(root / "runs" / name)}}
        if name == "right" and tracking_for_right:
            config["tracking"] = {"mlflow": {"enabled": True}}
        if name == "wrong":  # the right run's tokenizer, so both are adapters on one base a server can hold
            config["model"]["tokenizer"] = str(runs["right"])
            config["gate"] = {"against": str(runs["right"]), "data": str(files["test"]), "metrics": ["f1"]}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        result = CliRunner().invoke(app, ["train", str(path)])
        assert result.exit_code == 0, result.output
        runs[name] = root / "runs" / name
    return {**runs, "test": files["test"], "right_data": files["right"], "root": root}
