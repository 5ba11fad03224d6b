"""Peak memory of `dsft export --merge` (streaming merge) against PEFT's merge_and_unload, on a random-init model.

Builds a model from config (DeepSeek-V3 with MLA and MoE, or dense Qwen2) of a few hundred MB, saves it in shards
as transformers does, puts a LoRA adapter (dsft's all-linear: attention, routed experts, router) with random B on
it and saves the adapter. Then, each in a fresh process so no allocation of one counts in the other, merges:
  - stream: dsft's streaming merge (plan_merge + write_shards), output shards of --max-shard-size;
  - peft:   from_pretrained base, PeftModel.from_pretrained, merge_and_unload, save_pretrained.
Each process samples its resident memory every millisecond, as VmRSS (all of it, including the pages of weight
files it maps) and as RssAnon (heap and tensors only); peak minus the level just before the merge (after the
imports) is what the merge held.

Run: python benchmarks/export_merge_memory.py [--model deepseek-v3|qwen2] [--hidden 1024] [--layers 8]
     [--max-shard-size 100MB] [--out benchmarks/results/export_merge_memory.json]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path


def status_bytes(field: str) -> int:
    """A /proc/self/status field (kB) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class ResidentPeak:
    """Samples VmRSS and RssAnon every interval_s in a thread between start() and stop(); peaks holds the highest
    value seen of each."""

    FIELDS = ("VmRSS", "RssAnon")

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.peaks = {field: 0 for field in self.FIELDS}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self._update()
            self._done.wait(self.interval_s)

    def _update(self) -> None:
        for field in self.FIELDS:
            self.peaks[field] = max(self.peaks[field], status_bytes(field))

    def start(self) -> ResidentPeak:
        self._update()
        self._thread.start()
        return self

    def stop(self) -> dict[str, int]:
        self._done.set()
        self._thread.join()
        self._update()
        return self.peaks


def release_free_heap() -> None:
    """Hand freed heap back to the OS, so the level before a merge holds only live memory."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def model_config(kind: str, hidden: int, layers: int, vocab: int):
    from transformers import DeepseekV3Config, Qwen2Config

    if kind == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    return DeepseekV3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
        n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=2, n_group=1, topk_group=1,
        q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        tie_word_embeddings=False)


def build(args, root: Path) -> dict:
    """Save a random-init base (input shards of max_shard_size) and an all-linear LoRA adapter with random B."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsft.config import LoraConfig, MethodConfig
    from dsft.models.method import apply_method

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(args.model, args.hidden, args.layers, args.vocab))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest_bytes = max(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(root / "base", max_shard_size=args.max_shard_size)
    peft_model = apply_method(model, MethodConfig(type="lora", lora=LoraConfig(r=16, alpha=32)))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    peft_model.save_pretrained(root / "adapter")
    (root / "base" / "tokenizer_config.json").unlink(missing_ok=True)
    return {"model_bytes": model_bytes, "largest_tensor_bytes": largest_bytes,
            "parameters": sum(p.numel() for p in model.parameters()), "config": model.config.to_dict()}


def merge_stream(root: Path, max_shard_size: str) -> None:
    from transformers import AutoModelForCausalLM

    from dsft.export.merge import MergeSources, plan_merge
    from dsft.export.weights import parse_size, write_shards

    (root / "stream").mkdir()
    with closing(MergeSources(root / "adapter")) as sources:
        plan = plan_merge(root / "base", root / "adapter", root / "base", AutoModelForCausalLM, sources)
        write_shards(plan.tensors, root / "stream", parse_size(max_shard_size))


def merge_peft(root: Path, max_shard_size: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "base")
    merged = PeftModel.from_pretrained(base, root / "adapter").merge_and_unload()
    merged.save_pretrained(root / "peft", max_shard_size=max_shard_size)


def max_difference(first: Path, second: Path) -> float:
    """The largest absolute difference between same-named tensors of two model directories (same names asserted)."""
    from safetensors import safe_open

    def locations(directory: Path) -> dict[str, Path]:
        found = {}
        for path in directory.glob("*.safetensors"):
            with safe_open(path, framework="pt") as handle:
                found.update(dict.fromkeys(handle.keys(), path))
        return found

    left, right = locations(first), locations(second)
    assert left.keys() == right.keys(), "the two merges wrote different tensors"
    largest = 0.0
    for key, path in left.items():
        with safe_open(path, framework="pt") as a, safe_open(right[key], framework="pt") as b:
            largest = max(largest, (a.get_tensor(key).float() - b.get_tensor(key).float()).abs().max().item())
    return largest


def measure(mode: str, root: Path, max_shard_size: str) -> dict:
    """Run one merge in this process and return its peak memory above the level before it."""
    import torch  # noqa: F401  (imported before the baseline: libraries are not what the merge holds)
    import transformers  # noqa: F401
    from peft import PeftModel  # noqa: F401

    from dsft.export import merge  # noqa: F401

    release_free_heap()
    before = {field: status_bytes(field) for field in ResidentPeak.FIELDS}
    peak = ResidentPeak().start()
    started_s = time.perf_counter()
    (merge_stream if mode == "stream" else merge_peft)(root, max_shard_size)
    elapsed_s = time.perf_counter() - started_s
    peaks = peak.stop()
    out_files = list((root / mode).glob("*.safetensors"))
    return {"mode": mode, "peak_rss_above_start_bytes": peaks["VmRSS"] - before["VmRSS"],
            "peak_anon_above_start_bytes": peaks["RssAnon"] - before["RssAnon"], "rss_before_bytes": before["VmRSS"],
            "seconds": round(elapsed_s, 2), "output_bytes": sum(p.stat().st_size for p in out_files),
            "output_files": len(out_files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["deepseek-v3", "qwen2"], default="deepseek-v3")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-shard-size", default="100MB")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_merge_memory.json"))
    parser.add_argument("--measure", choices=["stream", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child process: one merge, its numbers on stdout
        print(json.dumps(measure(args.measure, args.root, args.max_shard_size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build(args, root)
        results = [_child(mode, root, args.max_shard_size) for mode in ("stream", "peft")]
        difference = max_difference(root / "stream", root / "peft")
    report = {"machine": _machine(),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "model": args.model,
              "parameters": model["parameters"], "model_bytes": model["model_bytes"],
              "largest_tensor_bytes": model["largest_tensor_bytes"], "max_shard_size": args.max_shard_size,
              "results": results, "max_abs_difference_stream_vs_peft": difference, "versions": _versions()}
    print(f"model: {model['parameters'] / 1e6:.1f} M parameters, {model['model_bytes'] / 1e6:.1f} MB "
          f"(largest tensor {model['largest_tensor_bytes'] / 1e6:.1f} MB), input and output shards {args.max_shard_size}")
    for result in results:
        rss, anon = result["peak_rss_above_start_bytes"], result["peak_anon_above_start_bytes"]
        print(f"{result['mode']:>6}: peak resident +{rss / 1e6:.1f} MB ({rss / model['model_bytes']:.2f} x the model), "
              f"of which anonymous +{anon / 1e6:.1f} MB ({anon / model['model_bytes']:.2f} x), {result['seconds']} s")
    print(f"largest difference between the two merged models: {difference:.3g}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


def _child(mode: str, root: Path, max_shard_size: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--measure", mode, "--root", str(root),
                           "--max-shard-size", max_shard_size], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _machine() -> str:
    import os

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    memory_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return f"{cpu}, {len(os.sched_getaffinity(0))} CPUs, {memory_gib:.0f} GiB, Linux {platform.release()}, no GPU"


def _versions() -> dict:
    import peft
    import safetensors
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "safetensors": safetensors.__version__}


if __name__ == "__main__":
    main()
