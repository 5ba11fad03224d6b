"""Throughput of `dsft data prepare` on a generated file: records/s for the whole pipeline.

Generates N alpaca records (default 1,000,000) with planted exact and near duplicates, PII and
HTML, then runs clean -> filter_quality -> pii -> dedup (exact + MinHash LSH) -> split with the
contamination check, and prints and writes the measured throughput as JSON.

Run: python benchmarks/prepare_throughput.py [--records 1000000] [--num-proc 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

TOPICS = ["blood pressure", "contract renewal", "loan interest", "refund policy", "drug dosage", "tax filing"]
VERBS = ["explain", "summarize", "check", "compare", "describe", "list"]


def _record(rng: random.Random, i: int) -> dict:
    topic, verb = rng.choice(TOPICS), rng.choice(VERBS)
    instruction = f"Please {verb} the {topic} question number {i} for customer {rng.randrange(10**6)}."
    if rng.random() < 0.05:
        instruction += f" Contact me at user{i}@example.com or 138{rng.randrange(10**8):08d}."
    if rng.random() < 0.03:
        instruction = f"<p>{instruction}</p>"
    output = f"The {topic} answer {i}: " + " ".join(rng.choice(VERBS + TOPICS) for _ in range(rng.randrange(5, 40)))
    return {"instruction": instruction, "output": output}


def write_data(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    previous: list[dict] = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            roll = rng.random()
            if previous and roll < 0.03:
                record = dict(rng.choice(previous))  # exact duplicate
            elif previous and roll < 0.05:
                base = rng.choice(previous)  # near duplicate: one word changed at the end
                record = {"instruction": base["instruction"], "output": base["output"] + " indeed"}
            else:
                record = _record(rng, i)
            previous = (previous + [record])[-1000:]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    from dsft.data.prepare import run_prepare
    from dsft.data.prepare_config import PrepareConfig

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "raw.jsonl"
        started_s = time.perf_counter()
        write_data(data, args.records)
        generate_s = time.perf_counter() - started_s
        config = PrepareConfig.model_validate({
            "inputs": [str(data)], "format": "alpaca", "num_proc": args.num_proc, "output_dir": str(Path(tmp) / "out"),
            "steps": [{"step": "clean", "strip_html": True}, {"step": "filter_quality"},
                      {"step": "pii", "kinds": ["email", "phone"]}, {"step": "dedup", "num_perm": 64}],
            "split": {"validation_ratio": 0.01, "test_ratio": 0.01},
        })
        report = run_prepare(config)
    result = {
        "benchmark": "prepare_throughput", "records": args.records, "num_proc": args.num_proc,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores",
        "generate_seconds": round(generate_s, 1), "prepare_seconds": report["seconds"],
        "records_per_second": report["records_per_second"], "steps": report["steps"], "splits": report["splits"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prepare_throughput.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("records", "prepare_seconds", "records_per_second", "splits")}))


if __name__ == "__main__":
    main()
