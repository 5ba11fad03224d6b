"""What dsft's MoE telemetry costs a training step: the same LoRA training steps (forward, backward, AdamW) on an MoE
model, with and without what method.moe adds to each step during training: the forward hooks that count each
router's (token, expert) pairs on the device (dsft.models.moe.ExpertLoads), the step's one copy of the counts to the
host, and DeepSeek-V3's bias update (DeepSeek-V2 shapes have no bias: the hooks and the copy only).

The two variants alternate step by step after warm-up steps, so drift of the machine (clocks, other load) falls on
both; the overhead is the ratio of their median step times.

  python benchmarks/moe_telemetry.py                                   # CPU: tiny-deepseek-v3, about a minute
  python benchmarks/moe_telemetry.py --shape deepseek-v2-lite --layers 6 --tokens 2048 \\
      --output benchmarks/results/moe_telemetry_v2_lite.json                    # a GPU: DeepSeek-V2-Lite's shapes

Writes the JSON (--output) and prints one line per variant.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(shape_name: str, layers: int | None, device: str):
    """A random-init MoE model of the shape (a dsft preset or a published shape, layers cut to --layers) with LoRA
    all-linear as dsft puts it on (models/method.py), in bfloat16 on a GPU."""
    from transformers import AutoModelForCausalLM

    from dsft.config import LoraConfig, MethodConfig
    from dsft.models.method import apply_method
    from dsft.models.presets import PRESETS, preset_config
    from dsft.models.shapes import published_shape, shape_config

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if shape_name in PRESETS:
        config = preset_config(shape_name, 512, 1, 2, 0)
    else:
        shape = published_shape(shape_name)
        if shape is None:
            raise SystemExit(f"--shape {shape_name}: neither a dsft preset nor a published shape")
        config = shape_config(shape, **({"num_hidden_layers": layers} if layers else {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    model = apply_method(model, MethodConfig(type="lora", lora=LoraConfig(r=16, alpha=32)))
    if device == "cuda":
        from dsft.models.moe_lora import register_grouped_lora

        model.get_base_model().set_experts_implementation(register_grouped_lora())
    return model, config


def measure(model, config, tokens: int, batch: int, steps: int, warmup: int, device: str) -> dict:
    from dsft.models.moe import ExpertLoads, apply_bias_updates

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (batch, tokens), generator=generator).to(device)
    mask = torch.ones_like(ids)
    loads = ExpertLoads(model, mode="train")
    times = {"off": [], "on": []}

    def one_step(telemetry: bool) -> float:
        loads.mode = "train" if telemetry else "off"  # "off": the hooks run, but never arm (see below)
        sync()
        started = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if telemetry:
            apply_bias_updates(loads.routers, loads.take_counts(), 0.001)
        sync()
        return time.perf_counter() - started

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    model.train()
    for step in range(warmup + 2 * steps):
        variant = "on" if step % 2 else "off"
        elapsed = one_step(variant == "on")
        if step >= warmup:
            times[variant].append(elapsed)
    loads.remove()
    # Without any hook at all, to show the unarmed hooks cost nothing either.
    bare = [one_step(False) for _ in range(steps)]
    median = {variant: statistics.median(values) for variant, values in times.items()}
    return {"step_s_median": {**median, "no_hooks": statistics.median(bare)},
            "overhead_percent": round(100.0 * (median["on"] / median["off"] - 1.0), 2),
            "step_s_all": times}


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny-deepseek-v3")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (a published shape's cut short)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "moe_telemetry_cpu.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config = build_model(args.shape, args.layers, device)
    result = measure(model, config, args.tokens, args.batch, args.steps, args.warmup, device)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{_cpu_name()}, {torch.get_num_threads()} threads"
    record = {"command": " ".join(sys.argv), "shape": args.shape, "layers": config.num_hidden_layers,
              "tokens_per_row": args.tokens, "batch": args.batch, "device": device, "machine": machine,
              "torch": torch.__version__, **result}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for variant, seconds in result["step_s_median"].items():
        print(f"{variant:>9}: {1000 * seconds:8.1f} ms/step")
    print(f"telemetry overhead: {result['overhead_percent']:+.2f}% ({machine}); wrote {args.output}")


if __name__ == "__main__":
    main()
