"""The method table, measured: the same data, the same steps, one fresh process per method (full, freeze, LoRA,
DoRA, QLoRA, prefix tuning), and for each: peak memory (as a share of full fine-tuning's), training tokens/s (as a
ratio to full's), trainable parameters, and held-out quality after training.

The task is a domain shift, so quality means adaptation: a base model first learns the quickstart task's English
unit conversions (full fine-tuning, --base-steps, once, not measured); each method then adapts it to the Chinese
ones for --steps steps; quality is exact match on the held-out Chinese prompts, with the English ones' exact match
after (what adapting forgot) and the validation perplexity. With --base-steps 0 (the GPU shapes, random init, where
no task is learnt in a few steps) the table keeps memory, speed, parameters and perplexity.

Memory: on CUDA the allocator's peak (torch.cuda.max_memory_allocated) over the run; on a CPU the peak resident set
size over what the process held after its imports (the model, its training state, activations and data).

  python benchmarks/methods.py                                   # CPU: a small Qwen2 shape, about 3 minutes
  python benchmarks/methods.py --shape deepseek-r1-distill-qwen-1.5b --base-steps 0 --steps 20 \\
      --max-length 2048 --batch-size 1 --output benchmarks/results/methods_gpu_1.5b.json       # a GPU

Writes the JSON (--output) and a markdown table beside it (.md); prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "data" / "quickstart"
SMALL_QWEN2 = {"architecture": "Qwen2ForCausalLM", "hidden_size": 384, "intermediate_size": 1536,
               "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
               "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
"""The CPU shape: R1-Distill-Qwen's architecture at 14 M parameters, big enough that its training state, not the
process's own, dominates the memory, small enough to train on two CPU cores in minutes."""
METHODS = {
    "full": {"type": "full"},
    "freeze": {"type": "freeze", "freeze": {"trainable_layers": 1}},
    "lora": {"type": "lora", "lora": {"r": 16, "alpha": 32}},
    "dora": {"type": "lora", "lora": {"r": 16, "alpha": 32, "use_dora": True}},
    "qlora": {"type": "qlora", "lora": {"r": 16, "alpha": 32}},
    "prefix": {"type": "prefix", "prefix": {"kind": "prefix", "num_virtual_tokens": 16}},
}
LEARNING_RATES = {"full": 1e-3, "freeze": 1e-3, "lora": 3e-3, "dora": 3e-3, "qlora": 3e-3, "prefix": 3e-2}
"""Each method's usual scale: adapters take larger steps than full fine-tuning, prefix tuning the largest."""


def _chinese(record: dict) -> bool:
    return bool(re.search(r"[\u4e00-\u9fff]", record["instruction"]))


def write_data(work: Path) -> dict[str, Path]:
    """English (base) and Chinese (adaptation) splits of the quickstart task, as alpaca jsonl files."""
    files = {}
    for name in ("train", "test"):
        rows = [json.loads(line) for line in (QUICKSTART / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        for language, keep in (("en", lambda r: not _chinese(r)), ("zh", _chinese)):
            path = work / f"{language}_{name}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if keep(r)), encoding="utf-8")
            files[f"{language}_{name}"] = path
    return files


def build_base(work: Path, shape_name: str, files: dict[str, Path], seed: int) -> Path:
    """A random-init model of the shape with a BPE tokenizer trained on the task's text, saved as a model directory."""
    import torch

    from dsft.data.tokenizer import train_bpe_tokenizer
    from dsft.models.shapes import published_shape, shape_config

    texts = [line for path in files.values() for line in path.read_text(encoding="utf-8").splitlines()]
    tokenizer = train_bpe_tokenizer(texts, 1024)
    shape = SMALL_QWEN2 if shape_name == "small-qwen2" else published_shape(shape_name)
    if shape is None:
        raise SystemExit(f"--shape {shape_name}: not small-qwen2 or a published shape (dsft/models/shapes.py)")
    vocab = max(shape.get("vocab_size", 0), len(tokenizer))  # a published shape keeps its real vocabulary's size
    config = shape_config(shape, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if torch.cuda.is_available() else None)
    base = work / "random_init"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def run_config(work: Path, name: str, model_dir: Path, method: dict, train_file: Path, args, steps: int,
               learning_rate: float) -> Path:
    config = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_files": [str(train_file)], "validation_ratio": 0.05, "max_length_tokens": args.max_length,
                 "chat_template": "deepseek_v3"},
        "method": method,
        "train": {"learning_rate": learning_rate, "max_steps": steps, "batch_size": args.batch_size,
                  "lr_scheduler": "cosine", "lr_warmup_steps": max(1, steps // 20), "logging_steps": 10,
                  "seed": args.seed, "tensorboard": False, "gradient_checkpointing": args.gradient_checkpointing},
        "output": {"dir": str(work / name), "overwrite": True},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def measure_one(config_path: str, result_path: str, held_out: list[str]) -> None:
    """In a fresh process: train the config, then write what it measured to result_path, with the exact match of
    the trained model's greedy answers on each held_out file."""
    import resource

    import torch

    from dsft.config import load_config
    from dsft.train.sft import run_sft

    baseline = _rss_bytes()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    config = load_config(config_path)
    result = run_sft(config)
    summary = result.summary
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline)
    exact = {Path(path).stem: _exact_match(result, config, path) for path in held_out}
    Path(result_path).write_text(json.dumps({
        "peak_memory_bytes": int(peak), "memory_kind": "cuda_allocated" if torch.cuda.is_available() else "cpu_rss_over_imports",
        "tokens_per_second": summary["tokens_per_second"], "trainable_parameters": summary["trainable_parameters"],
        "total_parameters": summary["total_parameters"], "weight_memory_bytes": summary["weight_memory_bytes"],
        "final_eval_loss": summary["final_eval_loss"],
        "perplexity": math.exp(summary["final_eval_loss"]) if summary["final_eval_loss"] is not None else None,
        "held_out": exact, "train_runtime_s": summary["train_runtime_s"],
    }, indent=2), encoding="utf-8")


def _exact_match(result, config, path: str) -> float:
    """Exact match of the trained model's greedy answers (10 new tokens) on the records of path, as SFT scores."""
    from dsft.data.dataset import DataStats, load_examples
    from dsft.eval.exact_match import score_exact_match
    from dsft.models.generate import DecodeSettings

    examples = load_examples([path], "auto", "error", DataStats())
    return score_exact_match(result.model, result.tokenizer, examples, config.data.chat_template,
                             DecodeSettings(max_new_tokens=10), 50).accuracy


def _rss_bytes() -> int:
    import os

    with open(f"/proc/{os.getpid()}/statm", encoding="utf-8") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(config: Path, work: Path, name: str, held_out: list[Path]) -> dict:
    result = work / f"{name}.result.json"
    command = [sys.executable, __file__, "--one", str(config), "--result", str(result),
               "--held-out", ",".join(map(str, held_out))]
    process = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if process.returncode != 0:
        return {"error": (process.stderr or process.stdout).strip().splitlines()[-1][:300]}
    return json.loads(result.read_text(encoding="utf-8"))


def table(results: dict) -> str:
    full = results.get("full", {})
    header = ("| method | peak memory (share of full) | tokens/s (ratio to full) | trainable parameters | "
              "held-out exact match, adapted (zh) | forgot? exact match (en) | perplexity |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | not run: {r['error']} | | | | | |")
            continue
        memory = r["peak_memory_bytes"] / full["peak_memory_bytes"] if full.get("peak_memory_bytes") else float("nan")
        speed = r["tokens_per_second"] / full["tokens_per_second"] if full.get("tokens_per_second") else float("nan")
        held = r["held_out"]
        lines.append(f"| {name} | {r['peak_memory_bytes'] / 2**20:,.0f} MiB ({memory:.0%}) | "
                     f"{r['tokens_per_second']:,.0f} ({speed:.2f}x) | {r['trainable_parameters']:,} | "
                     f"{held.get('zh_test', float('nan')):.2f} | {held.get('en_test', float('nan')):.2f} | "
                     f"{r['perplexity']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small-qwen2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/dsft_methods")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "methods_cpu.json"))
    parser.add_argument("--one")
    parser.add_argument("--result")
    parser.add_argument("--held-out", default="")
    args = parser.parse_args()
    if args.one:
        measure_one(args.one, args.result, [path for path in args.held_out.split(",") if path])
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = write_data(work)
    started = time.perf_counter()
    base = build_base(work, args.shape, files, args.seed)
    held_out = [files["zh_test"], files["en_test"]] if args.base_steps else []
    base_result = None
    if args.base_steps:
        config = run_config(work, "base", base, {"type": "full"}, files["en_train"], args, args.base_steps, 3e-3)
        base_result = _child(config, work, "base", held_out)
        if "error" in base_result:
            raise SystemExit(f"base training failed: {base_result['error']}")
        print("base", json.dumps(base_result), flush=True)
        base = work / "base"
    results = {}
    for name in args.methods.split(","):
        config = run_config(work, name, base, METHODS[name], files["zh_train"], args, args.steps, LEARNING_RATES[name])
        results[name] = _child(config, work, name, held_out)
        print(name, json.dumps(results[name]), flush=True)
    markdown = table(results)
    import torch

    record = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                          "cpu_count": __import__("os").cpu_count()},
              "command": " ".join(sys.argv), "shape": args.shape, "base_steps": args.base_steps, "steps": args.steps,
              "batch_size": args.batch_size, "max_length_tokens": args.max_length, "learning_rates": LEARNING_RATES,
              "methods": {name: METHODS[name] for name in results}, "base": base_result, "results": results,
              "wall_s": round(time.perf_counter() - started, 1), "table": markdown}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    output.with_suffix(".md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)


if __name__ == "__main__":
    main()
