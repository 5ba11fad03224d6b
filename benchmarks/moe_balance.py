"""What method.moe does to the expert load of a domain fine-tuning run, measured: the same data and steps on tiny
DeepSeek MoE models through the real CLI (dsft train), one run per routing policy, each read back from its
expert_load.json (the load before training and after it, routed on the same training samples, and over every token
the run trained on) and its weights (are the frozen gates bit-identical to the start?).

  python benchmarks/moe_balance.py            # CPU, about two minutes; writes benchmarks/results/moe_balance_cpu.json

Prints a markdown table: for each policy the worst layer's imbalance (max share / mean share), the mean coefficient
of variation over layers and the cold experts (under 10% of the mean share) of all layers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "data" / "quickstart" / "train.jsonl"
POLICIES = {
    "v3 router train, bias off": ("tiny-deepseek-v3", {"router": "train", "bias_update": "off"}),
    "v3 router train, bias on (gamma 0.01)": ("tiny-deepseek-v3", {"router": "train", "bias_update": "on",
                                                                   "bias_update_speed": 0.01}),
    "v3 router freeze": ("tiny-deepseek-v3", {"router": "freeze"}),
    "v2 router train, no aux loss": ("tiny-deepseek-v2", {"router": "train"}),
    "v2 router train, expert aux loss 0.1": ("tiny-deepseek-v2", {"router": "train", "aux_loss": {"expert": 0.1}}),
}


def run(work: Path, name: str, preset: str, moe: dict, steps: int, learning_rate: float) -> dict:
    folder = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    folder.mkdir(parents=True)
    config = {"model": {"preset": preset}, "method": {"type": "full", "moe": moe},
              "data": {"train_files": [str(QUICKSTART)], "max_length_tokens": 64},
              "train": {"learning_rate": learning_rate, "max_steps": steps, "batch_size": 8, "logging_steps": 10,
                        "seed": 0, "tensorboard": False},
              "output": {"dir": str(folder / "run")}}
    (folder / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "dsft.cli", "train", str(folder / "run.yaml")],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{name}: dsft train failed\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    run_dir = folder / "run"
    report = json.loads((run_dir / "expert_load.json").read_text(encoding="utf-8"))
    phases = {phase: {key: values.get(key) for key in ("moe_load_imbalance", "moe_load_cv", "moe_cold_experts")}
              for phase, values in report["phases"].items()}
    return {"preset": preset, "moe": moe, "phases": phases, "gates_unchanged": _gates_unchanged(run_dir, preset)}


def _gates_unchanged(run_dir: Path, preset: str) -> bool:
    """Whether every router gate weight equals the run's starting weights (the preset rebuilt with its seed)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from dsft.models.presets import build_preset

    trained = load_file(run_dir / "model.safetensors")
    start = build_preset(preset, AutoTokenizer.from_pretrained(run_dir), seed=0, dtype=torch.float32).state_dict()
    gates = [key for key in trained if key.endswith("mlp.gate.weight")]
    return all(torch.equal(trained[key], start[key]) for key in gates)


def table(results: dict) -> str:
    lines = ["| policy | before: imbalance / cv / cold | after | over training | gates unchanged |",
             "|---|---|---|---|---|"]
    for name, result in results.items():
        cells = []
        for phase in ("before", "after", "training"):
            values = result["phases"][phase]
            cells.append(f"{values['moe_load_imbalance']:.2f} / {values['moe_load_cv']:.2f} / "
                         f"{values['moe_cold_experts']}")
        lines.append(f"| {name} | {' | '.join(cells)} | {'yes' if result['gates_unchanged'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "moe_balance_cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = {name: run(Path(work), name, preset, moe, args.steps, args.learning_rate)
                   for name, (preset, moe) in POLICIES.items()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(sys.argv), "steps": args.steps, "learning_rate": args.learning_rate,
              "data": str(QUICKSTART.relative_to(ROOT)), "results": results}
    args.output.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(table(results))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
