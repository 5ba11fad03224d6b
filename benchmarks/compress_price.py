"""What each `dsft compress` method costs, measured through the real CLI on the quickstart model (tiny-deepseek-v3,
full fine-tuning on the unit-conversion data, exact match about 0.88 on its 100 held-out prompts): size on disk,
memory to load, generation speed, and exact match and chrF on the held-out prompts, compressed against
uncompressed (dsft compress --eval), each change with its paired bootstrap interval.

  python benchmarks/compress_price.py                  # CPU: trains the quickstart (about 80 s), then every method
  python benchmarks/compress_price.py --run runs/quickstart     # reuse a trained run

Writes benchmarks/results/compress_cpu.json (or --output) and prints a markdown table. A method that refuses the
architecture is listed with its refusal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT / "examples" / "data" / "quickstart" / "test.jsonl"
METHODS = {
    "int8-dynamic": [], "int8-weight": [], "int4-weight": [],
    "prune-magnitude 30%": ["--set", "compress.sparsity=0.3"],
    "prune-magnitude 60%": ["--set", "compress.sparsity=0.6"],
    "prune-layers 1 of 4": ["--set", "compress.drop_layers=1"],
    "prune-experts 2 of 8": ["--set", "compress.drop_experts=2"],
}


def train_quickstart(work: Path) -> Path:
    config = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text(encoding="utf-8"))
    config["output"] = {"dir": str(work / "quickstart")}  # its data paths are relative to the repository root
    (work / "quickstart.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    done = _dsft("train", str(work / "quickstart.yaml"))
    if done.returncode != 0:
        raise SystemExit(f"dsft train failed:\n{done.stderr[-3000:]}")
    return work / "quickstart"


def _dsft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsft.cli", *args], capture_output=True, text=True, check=False,
                          cwd=ROOT)


def compress(run: Path, name: str, extra: list[str], work: Path) -> dict:
    out = work / name.replace(" ", "_").replace("%", "pct")
    method = name.split(" ")[0]
    done = _dsft("compress", str(run), "--method", method, "--out", str(out), "--eval", str(TEST),
                 "--set", "eval.metrics=[exact_match, chrf]", "--set", "eval.bootstrap_resamples=200", *extra)
    if not (out / "dsft_compress.json").is_file():
        return {"method": name, "refused": (done.stderr.strip().splitlines() or ["?"])[-1]}
    record = json.loads((out / "dsft_compress.json").read_text(encoding="utf-8"))
    price = record["report"]
    speed = price["speed"]
    return {"method": name, "settings": record["settings"], "size_ratio": price["size_ratio"],
            "weights_bytes": price["weights_bytes"],
            "load_rss_growth_mib": {k: v["rss_growth_mib"] for k, v in price["load"].items()},
            "tokens_per_second_batch1": {k: (v or {}).get("tokens_per_second_batch1") for k, v in speed.items()},
            "metrics": {m["name"]: {k: m[k] for k in ("baseline", "candidate", "drop_percent", "interval_percent")}
                        for m in price["metrics"]}}


def table(rows: list[dict]) -> str:
    lines = ["| method | size ratio | exact match (change, interval) | chrF | tokens/s batch 1 | load RSS growth |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "refused" in row:
            lines.append(f"| {row['method']} | refused: {row['refused']} | | | | |")
            continue
        em, chrf = row["metrics"]["exact_match"], row["metrics"]["chrf"]
        span = em["interval_percent"]
        speed, memory = row["tokens_per_second_batch1"], row["load_rss_growth_mib"]
        lines.append(
            f"| {row['method']} | {row['size_ratio']:.2f}x | {em['baseline']:.2f} -> {em['candidate']:.2f} "
            f"({0.0 - em['drop_percent']:+.1f}%, [{span[0]:+.1f}%, {span[1]:+.1f}%]) | "
            f"{chrf['baseline']:.1f} -> {chrf['candidate']:.1f} | {speed['uncompressed']} -> {speed['compressed']} | "
            f"{memory['uncompressed']:.0f} -> {memory['compressed']:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="A trained quickstart run; default: train one now.")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "compress_cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        run = args.run or train_quickstart(work)
        rows = [compress(run, name, extra, work) for name, extra in METHODS.items()]
    import torch

    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.cuda.is_available()},
              "model": "quickstart: tiny-deepseek-v3 full fine-tuning (examples/quickstart.yaml)",
              "eval_data": str(TEST.relative_to(ROOT)), "methods": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(rows))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
