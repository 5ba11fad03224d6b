"""The price of a compression, measured: weights on disk, peak memory of loading (each model in a fresh process,
so neither counts the other), and with eval data every `dsft eval` metric with its interval and the generation
speed, compressed against uncompressed on the same prompts; each metric's change is judged by the gate's rule
(dsft/lifecycle/gate_math.py) against compress.max_drop_percent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from dsft.config.compress import CompressConfig
from dsft.errors import DsftError
from dsft.lifecycle.gate_math import MEAN_OF_EXAMPLES, judge, paired_change_interval

PROBE = """
import json, resource, sys, torch
from transformers import AutoModelForCausalLM
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto", use_safetensors=True)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"load_peak_rss_mib": after / 1024, "rss_growth_mib": (after - before) / 1024,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "zero_parameters": sum(int((p.data == 0).sum()) for p in model.parameters()
                                         if type(p.data) is torch.Tensor)}))
"""
"""Run as `python -c PROBE DIR`: ru_maxrss is KiB on Linux; zeros are counted in plain tensors only (a quantized
tensor's storage is not its values)."""


def weights_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in Path(model_dir).glob("*.safetensors"))


def load_footprint(model_dir: Path) -> dict:
    """Peak resident memory of a fresh Python process loading model_dir, and its parameter counts."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(model_dir)], capture_output=True, text=True, timeout=900,
                          check=False)
    if done.returncode != 0:
        raise DsftError(f"{model_dir} does not load with transformers: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_price(source: Path, compressed: Path, eval_data: str | None, settings: CompressConfig,
                  eval_overrides: list[str], work: Path, console) -> dict:
    sizes = {"uncompressed": weights_bytes(source), "compressed": weights_bytes(compressed)}
    price = {"weights_bytes": sizes, "size_ratio": sizes["uncompressed"] / max(1, sizes["compressed"]),
             "load": {"uncompressed": load_footprint(source), "compressed": load_footprint(compressed)}}
    if eval_data is None:
        if settings.max_drop_percent is not None:
            raise DsftError("--max-drop needs --eval DATA: the drop is measured on it")
        return {**price, "verdict": "not evaluated", "metrics": []}
    from dsft.eval.evaluate import run_eval

    results = run_eval(str(compressed), eval_data, against_path=str(source), out_dir=str(work / "eval"),
                       overrides=eval_overrides, console=console)
    shutil.move(str(work / "eval"), str(compressed / "eval"))
    verdicts = judge_metrics(results, settings)
    failed = settings.max_drop_percent is not None and not all(v["passed"] for v in verdicts)
    speed = {role: results["models"][role].get("speed") for role in ("target", "against")}
    return {**price, "eval": {"data": eval_data, "data_sha256": results["data"]["sha256"],
                              "examples": results["data"]["examples"]},
            "metrics": verdicts, "speed": {"compressed": speed["target"], "uncompressed": speed["against"]},
            "verdict": "failed" if failed else ("passed" if settings.max_drop_percent is not None else "measured")}


def judge_metrics(results: dict, settings: CompressConfig) -> list[dict]:
    """Each metric both models have: its change, paired interval and verdict under max_drop_percent (without a
    bound: every change reported, nothing failed)."""
    compressed, uncompressed = results["models"]["target"], results["models"]["against"]
    per_example = {role: {} for role in ("target", "against")}
    for example in results["examples"]:
        for role, scores in per_example.items():
            for name, value in example["scores"][role].items():
                scores.setdefault(name, []).append(value)
    bound = settings.max_drop_percent if settings.max_drop_percent is not None else 100.0
    verdicts = []
    for name, value in compressed["metrics"].items():
        if name not in uncompressed["metrics"] or not isinstance(value, int | float):
            continue
        interval = None
        if name in MEAN_OF_EXAMPLES:
            interval = paired_change_interval(per_example["against"].get(name, []),
                                              per_example["target"].get(name, []), 1000, 0, 0.95)
        verdict = judge(name, uncompressed["metrics"][name], value, interval, bound, False).as_dict()
        if settings.max_drop_percent is None:
            drop = verdict["drop_percent"]
            change = f"worse by {drop:.2f}%" if drop > 0 else f"better by {-drop:.2f}%" if drop < 0 else "unchanged"
            verdict["why"] = f"{change} (no bound set)"
        verdicts.append(verdict)
    return verdicts
