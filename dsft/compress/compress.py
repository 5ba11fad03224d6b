"""`dsft compress RUN_OR_DIR --method M --out DIR`, top to bottom: settings -> the uncompressed model (a run
exported, a LoRA run merged by the streaming merge) -> calibration -> compress -> write (aside, then renamed into
place) -> the price: size, peak memory when loaded, and with --eval every `dsft eval` metric with intervals,
compressed against uncompressed on the same prompts -> report.

OUT is a plain Hugging Face model directory (safetensors, config, tokenizer) that `dsft eval`, `generate` and
`serve` load, with dsft_compress.json (method, settings, calibration data fingerprint, the report) and
compression_report.md. With compress.max_drop_percent (--max-drop) a compressed model whose metrics drop more is
marked failed and the exit code is 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from rich.console import Console

from dsft.config.compress import CompressConfig
from dsft.errors import DsftError

RECORD_FILE = "dsft_compress.json"
REPORT_FILE = "compression_report.md"


def run_compress(target: str, method: str, out: str, calibration: str | None, eval_data: str | None,
                 overrides: list[str], console: Console | None = None) -> int:
    """Compress target into out (see the module docstring); returns the exit code (0, or 1 when the accuracy
    bound failed). Raises DsftError for bad settings, inputs or an architecture a method does not apply to."""
    from dsft.compress.measure import measure_price
    from dsft.compress.report import write_report

    console = console or Console(soft_wrap=True)
    settings = compress_settings(method, [o for o in overrides if o.startswith("compress.")])
    eval_overrides = [o for o in overrides if not o.startswith("compress.")]
    out_dir = _checked_out(Path(out), Path(target))
    work = out_dir.parent / f".{out_dir.name}.work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        source = _uncompressed(Path(target), work / "uncompressed")
        calibration_path = calibration or _default_calibration(Path(target))
        record = _compress_into(source, work / "compressed", settings, calibration_path, console)
        price = measure_price(source, work / "compressed", eval_data, settings, eval_overrides, work, console)
        record["report"] = price
        (work / "compressed" / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        write_report(record, work / "compressed" / REPORT_FILE, console)
        (work / "compressed").rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    console.print(f"wrote {out_dir} ({price['verdict']})", markup=False)
    return 1 if price["verdict"] == "failed" else 0


def compress_settings(method: str, overrides: list[str]) -> CompressConfig:
    from pydantic import ValidationError

    from dsft.config.loader import apply_override

    raw = {"compress": {"method": method}}
    for override in overrides:
        apply_override(raw, override)
    try:
        return CompressConfig.model_validate(raw["compress"])
    except ValidationError as exc:
        problems = "; ".join(f"{'--method' if e['loc'] == ('method',) else 'compress.' + '.'.join(map(str, e['loc']))}"
                             f": {e['msg']}" for e in exc.errors())
        raise DsftError(problems) from None


def _checked_out(out: Path, target: Path) -> Path:
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise DsftError(f"--out {out} exists and is not empty; name a new directory")
    if target.exists() and (out == target.resolve() or target.resolve() in out.parents):
        raise DsftError(f"--out {out} lies inside {target}; write the compressed model elsewhere")
    if out.exists():
        out.rmdir()
    return out


def _uncompressed(target: Path, dest: Path) -> Path:
    """A plain Hugging Face directory of the model to compress: a run exported (a LoRA run merged into its base,
    streamed), or the model directory itself."""
    from dsft.config import load_config

    if not (target / "config.yaml").is_file():
        if not (target / "config.json").is_file():
            raise DsftError(f"{target}: neither a dsft run directory nor a Hugging Face model directory")
        return target
    config = load_config(target / "config.yaml")
    if config.task != "causal_lm":
        raise DsftError(f"{target}: a {config.task} run; this version of dsft compress takes causal_lm runs and "
                        "model directories")
    from dsft.export.export import write_export

    write_export(target, dest, merge=True)
    return dest


def _default_calibration(target: Path) -> str | None:
    """The run's first training file: the data the model was tuned on, as the run rendered it."""
    if (target / "config.yaml").is_file():
        from dsft.config import load_config

        files = load_config(target / "config.yaml").data.train_files
        return files[0] if files else None
    return None


def _compress_into(source: Path, dest: Path, settings: CompressConfig, calibration: str | None, console) -> dict:
    from dsft.compress.quantize import QUANTIZE_METHODS, load_quantized
    from dsft.data.tokenizer import load_tokenizer
    from dsft.eval.targets import load_target

    fingerprint = None
    if settings.method in QUANTIZE_METHODS:  # loaded quantized: the float model is never held as well
        model, tokenizer = load_quantized(source, settings), load_tokenizer(str(source))
        details = {"library": "torchao", "quantized": model.config.quantization_config.to_dict()["quant_type"]}
    else:
        target = load_target(str(source))
        model, tokenizer = target.model.float(), target.tokenizer
        details, fingerprint = _pruned(model, target, settings, calibration, console)
    dest.mkdir(parents=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    _check_reloads(model, dest, settings.method)
    return {"method": settings.method, "settings": settings.model_dump(mode="json"), "source": str(source),
            "calibration": {"path": calibration, "sha256": fingerprint} if fingerprint else None, "details": details}


def _pruned(model, target, settings: CompressConfig, calibration: str | None, console) -> tuple[dict, str | None]:
    """(details, calibration sha256 or None) of pruning model in place by settings.method."""
    from dsft.compress import prune

    if settings.method == "prune-magnitude":
        return prune.magnitude_prune(model, settings.sparsity), None
    if calibration is None:
        raise DsftError(f"{settings.method} measures the model on calibration data: give --calibration FILE")
    ids = calibration_ids(calibration, target, settings)
    fingerprint = hashlib.sha256(Path(calibration).read_bytes()).hexdigest()
    if settings.method == "prune-layers":
        details = prune.drop_layers(model, settings.drop_layers, prune.block_influence(model, ids))
        console.print(f"prune-layers: dropping layers {details['dropped_layers']} (block influence "
                      f"{[round(v, 4) for v in details['block_influence']]})", markup=False)
        return details, fingerprint
    from dsft.compress.experts import prune_experts

    details = prune_experts(model, settings.drop_experts, ids)
    console.print(f"prune-experts: {details['experts_before']} -> {details['experts_after']} routed experts per "
                  "MoE layer", markup=False)
    return details, fingerprint


def calibration_ids(path: str, target, settings: CompressConfig) -> list[list[int]]:
    """Token ids of the first calibration_samples records of path, rendered as training renders them (the
    conversation through the model's chat template, or a text record as a document)."""
    from dsft.data.chat import render_conversation, render_text
    from dsft.data.dataset import DataStats, load_examples
    from dsft.data.encode import encode_segments

    if not Path(path).is_file():
        raise DsftError(f"--calibration {path}: no such file")
    examples = load_examples([path], "auto", "error", DataStats(), require_answer=False)[: settings.calibration_samples]
    rows = []
    for example in examples:
        segments = (render_text(example.text, target.tokenizer) if example.text is not None else
                    render_conversation(example.messages, target.template, target.tokenizer, "all", target.thinking,
                                        tools=example.tools))
        ids, _ = encode_segments(segments, target.tokenizer)
        rows.append(ids[: settings.calibration_max_tokens])
    if not rows:
        raise DsftError(f"--calibration {path}: no records to calibrate on")
    return rows


def _check_reloads(model, saved: Path, method: str) -> None:
    """The written directory must rebuild the model just compressed: same logits on a probe."""
    import torch
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32, use_safetensors=True).eval()
    probe = torch.arange(1, 9).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        same = torch.allclose(model.eval()(probe).logits, again(probe).logits, atol=1e-4, rtol=1e-4)
    if not same:
        raise DsftError(f"{method}: the saved model does not rebuild the compressed one on {model.config.model_type} "
                        "(its config assigns layer kinds by position); this architecture is not supported by "
                        f"{method}")
