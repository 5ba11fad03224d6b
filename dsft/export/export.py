"""`dsft export RUN --out DIR [--merge]`: a run directory as a plain Hugging Face model directory.

What --out receives, by run:
  - full or freeze run: the model's safetensors (shards and index as saved), config.json, generation_config.json
    and the tokenizer (with its chat template);
  - LoRA run, --merge: the adapter merged into its base, streamed tensor by tensor (merge.py), in the base
    checkpoint's own format, with the run model's config.json (a classifier's labels), the base's generation
    config and the run's tokenizer; it loads with plain transformers, and serving engines that cannot load
    adapters on MoE experts (vLLM) load it as any model;
  - LoRA run, no --merge: the adapter kept separate (adapter_config.json, adapter_model.safetensors, tokenizer),
    with a copy of its base in base_model/ when the base is local (a preset's random init, a local directory),
    or naming the hub model the run used; it loads with plain PEFT.
No checkpoints or dsft run files travel, except dsft_export.json: where it came from and what was done.
The directory is written aside and renamed into place: an interrupted export leaves no partial --out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import torch

from dsft.config import RunConfig, load_config
from dsft.errors import DsftError
from dsft.export.merge import MergeSources, plan_merge
from dsft.export.weights import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    TensorReader,
    dtype_names,
    parse_size,
    passthrough,
    read_index,
    weight_files,
    write_shards,
)
from dsft.models import load
from dsft.models.auto import auto_model_class
from dsft.models.load import ADAPTER_CONFIG_FILE, BASE_MODEL_DIR, run_task
from dsft.paths import resolve_inside

PROVENANCE_FILE = "dsft_export.json"
MODEL_CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
)
"""The files transformers' tokenizers save; those the run directory has are copied."""
DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""--dtype choices: keep stores each tensor as the run (or base) does."""


def export_run(run: str | Path, out: str | Path, merge: bool = False, max_shard_size: str = "2GB",
               dtype: str = "keep", overwrite: bool = False, console=None) -> dict:
    """Export run directory run into out (see the module docstring); returns what dsft_export.json records.

    Raises DsftError for a directory that is not a finished dsft run, a multitask run, pickled weights, an out
    that exists and is not empty (unless overwrite), lies inside the run or contains it, a bad size or dtype, or
    an adapter that cannot be merged tensor by tensor.
    """
    from rich.console import Console

    console = console or Console(soft_wrap=True)
    if dtype not in DTYPES:
        raise DsftError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    max_shard_bytes = parse_size(max_shard_size)
    run_dir = _checked_run_dir(run)
    out_dir = _checked_out_dir(run_dir, Path(out), overwrite)
    started_s = time.perf_counter()
    record = write_export(run_dir, out_dir, merge, max_shard_bytes, DTYPES[dtype])
    console.print(f"exported {run_dir} -> {out_dir}: {_layout_line(record)}, {record['shards']} weight file(s), "
                  f"{record['total_bytes'] / 1e6:,.1f} MB in {time.perf_counter() - started_s:.1f} s")
    return record


def _checked_run_dir(run: str | Path) -> Path:
    """The resolved run directory; raises DsftError unless it holds a finished dsft run with safetensors weights
    (a multitask run has no single Hugging Face model to export)."""
    run_dir = Path(run).resolve()
    if not resolve_inside(run_dir, "config.yaml", "run config").is_file():
        raise DsftError(f"{run}: not a dsft run directory (no config.yaml)")
    config = load_config(run_dir / "config.yaml")
    if config.task == "multitask":
        raise DsftError(f"{run}: a multitask run is a backbone with dsft's own heads, no single Hugging Face model; "
                        "dsft export takes causal LM, classification and token classification runs")
    is_lora = resolve_inside(run_dir, ADAPTER_CONFIG_FILE, "adapter config").is_file()
    load._require_safetensors(run_dir, run_dir, "adapter_model" if is_lora else "model")
    return run_dir


def write_export(run_dir: Path, out_dir: Path, merge: bool, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 dtype: torch.dtype | None = None) -> dict:
    """Write the export of the checked run_dir into out_dir (replacing it), through a staging directory renamed
    into place; returns the provenance record. Raises DsftError as the layouts do, or when a file cannot be written."""
    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir).resolve()
    config = load_config(run_dir / "config.yaml")
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        if not (run_dir / ADAPTER_CONFIG_FILE).is_file():
            record = {"adapter": None, **_write_model_files(run_dir, staging, max_shard_bytes, dtype)}
        elif merge:
            record = {"adapter": "merged", **_write_merged(run_dir, config, staging, max_shard_bytes, dtype)}
        else:
            record = {"adapter": "separate", **_write_adapter(run_dir, config, staging, out_dir, max_shard_bytes, dtype)}
        _copy_files(run_dir, staging, TOKENIZER_FILES)
        record = _provenance(run_dir, config, record)
        (staging / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _publish(staging, out_dir)
    except OSError as exc:
        raise DsftError(f"cannot write the export into {out_dir}: {exc}; nothing was exported") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _write_model_files(model_dir: Path, dest: Path, max_shard_bytes: int, dtype: torch.dtype | None) -> dict:
    """model_dir's weights, config.json and generation_config.json into dest: the weight files copied as they are,
    or, with dtype, rewritten tensor by tensor in shards of max_shard_bytes. Returns the weights' summary."""
    dest.mkdir(parents=True, exist_ok=True)
    stored = read_index(model_dir)
    if dtype is None:
        files = weight_files(model_dir)
        for path in files + ([model_dir / INDEX_FILE] if (model_dir / INDEX_FILE).is_file() else []):
            shutil.copy2(path, dest / path.name)
        summary = {"shards": len(files), "total_bytes": sum(_nbytes(item.shape, item.dtype) for item in stored.values()),
                   "dtypes": dtype_names(item.dtype for item in stored.values())}
    else:
        with closing(TensorReader()) as reader:
            summary = write_shards(list(passthrough(stored, reader, dtype)), dest, max_shard_bytes)
    _copy_files(model_dir, dest, MODEL_CONFIG_FILES)
    _set_config_dtype(dest, dtype)
    return summary


def _write_merged(run_dir: Path, config: RunConfig, staging: Path, max_shard_bytes: int, dtype) -> dict:
    """The run's adapter merged into its base, streamed into staging with the model's config files."""
    if not config.method.lora_family:
        what = {"prefix": "prefix and prompt tuning add trained positions, not weight updates",
                "ia3": "IA3's rescaling vectors are not merged tensor by tensor by dsft"}[config.method.type]
        raise DsftError(f"{run_dir}: a method.type {config.method.type} run; {what}: export without --merge "
                        "(the adapter and its base, which PEFT loads)")
    base_dir = _merge_base_dir(run_dir, config)
    # A classifier run keeps its model's config.json (labels, head size) beside the adapter; else the base's is it.
    model_config_dir = run_dir if (run_dir / "config.json").is_file() else base_dir
    model_config = json.loads((model_config_dir / "config.json").read_text(encoding="utf-8"))
    rebuilt = quantized_base(run_dir, config)
    if rebuilt is not None:
        model_config.pop("quantization_config", None)  # a qlora classifier's config.json: the merge writes floats
    if "quantization_config" in model_config:
        raise DsftError(f"{model_config_dir / 'config.json'}: the base is quantized "
                        f"({model_config['quantization_config'].get('quant_method', 'unknown method')}); dsft merges "
                        "into float weights only: export without --merge")
    auto_class = auto_model_class(run_task(config))
    with closing(MergeSources(run_dir)) as sources:
        plan = plan_merge(base_dir, run_dir, model_config_dir, auto_class, sources, dtype, config.model.trust_remote_code,
                          rebuilt)
        summary = write_shards(plan.tensors, staging, max_shard_bytes)
    if plan.untied:
        model_config["tie_word_embeddings"] = False  # the adapter changed one side of the tied pair only
    (staging / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _copy_files(base_dir, staging, ("generation_config.json",))
    _set_config_dtype(staging, dtype)
    return {**summary, "base_model": str(base_dir), "untied": plan.untied, "dropped": plan.dropped}


def quantized_base(run_dir: Path, config: RunConfig):
    """For a qlora run, how the merge rebuilds each quantized base weight as training saw it (quantization.json);
    None for other runs."""
    if config.method.type != "qlora":
        return None
    from dsft.models.quantize import QUANTIZATION_FILE, require_bitsandbytes, round_trip

    require_bitsandbytes()
    path = run_dir / QUANTIZATION_FILE
    if not path.is_file():
        raise DsftError(f"{path}: missing; a qlora run records which base weights it quantized there, and a merge "
                        "rebuilds them from it")
    record = json.loads(path.read_text(encoding="utf-8"))
    dtype = getattr(torch, record["dtype"])
    return {key: (lambda weight, size=size: round_trip(weight.to(dtype), record["qlora"], size))
            for key, size in record["weights"].items()}


def _write_adapter(run_dir: Path, config: RunConfig, staging: Path, out_dir: Path, max_shard_bytes: int, dtype) -> dict:
    """The adapter as PEFT saved it, on a copy of its local base in base_model/ or on the hub model it names."""
    local_base, hub_id = _base_location(run_dir, config)
    adapter_config = json.loads((run_dir / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    if local_base is not None:
        summary = _write_model_files(local_base, staging / BASE_MODEL_DIR, max_shard_bytes, dtype)
        # Absolute, as in the run directory: PEFT resolves a relative base against the working directory.
        adapter_config["base_model_name_or_path"] = str(out_dir.resolve() / BASE_MODEL_DIR)
    else:
        summary = {"shards": 0, "total_bytes": 0, "dtypes": []}
        adapter_config["base_model_name_or_path"] = hub_id
        adapter_config["revision"] = config.model.revision
    (staging / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n",
                                               encoding="utf-8")
    shutil.copy2(run_dir / "adapter_model.safetensors", staging / "adapter_model.safetensors")
    _copy_files(run_dir, staging, ("config.json",))  # a classifier's labels, which the adapter files lack
    return {**summary, "base_model": adapter_config["base_model_name_or_path"]}


def _base_location(run_dir: Path, config: RunConfig) -> tuple[Path | None, str | None]:
    """(local base directory, None) or (None, hub id) of a LoRA run's base, checked as load_run_model does."""
    adapter_config = run_dir / ADAPTER_CONFIG_FILE
    recorded = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if os.path.lexists(run_dir / BASE_MODEL_DIR):
        return load._own_base_dir(run_dir, recorded, adapter_config), None
    name = config.model.name_or_path
    if recorded not in (None, name):
        raise DsftError(f"{adapter_config}: base_model_name_or_path {recorded!r} is neither this run's "
                        f"{BASE_MODEL_DIR}/ nor model.name_or_path of its config.yaml ({name!r}); no other base is used")
    if Path(name).is_dir():
        base_dir = Path(name).resolve()
        load._require_safetensors(base_dir, base_dir, "model")
        return base_dir, None
    return None, name


def _merge_base_dir(run_dir: Path, config: RunConfig) -> Path:
    """A local directory with the base's safetensors: the run's own, or the hub model's files (downloaded or cached)."""
    local_base, hub_id = _base_location(run_dir, config)
    if local_base is not None:
        return local_base
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, revision=config.model.revision, token=load.hub_token(config.model),
                                      allow_patterns=["*.safetensors", "*.safetensors.index.json", "*.json"]))
    except (OSError, ValueError) as exc:
        raise DsftError(f"model.name_or_path: cannot fetch the safetensors of {hub_id!r} to merge into "
                        f"({str(exc).splitlines()[0]}); export without --merge keeps the adapter separate") from None


def _checked_out_dir(run_dir: Path, out: Path, overwrite: bool) -> Path:
    """The resolved --out; raises DsftError if it is or lies inside the run, contains the run, is a file, or is a
    directory with files in it and overwrite is off."""
    out_dir = out.resolve()
    if out_dir.is_relative_to(run_dir):
        raise DsftError(f"--out {out}: lies inside the run directory {run_dir}; export next to it instead")
    if run_dir.is_relative_to(out_dir):
        raise DsftError(f"--out {out}: contains the run directory {run_dir}; choose a directory outside of it")
    if out_dir.exists() and not out_dir.is_dir():
        raise DsftError(f"--out {out}: is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DsftError(f"--out {out}: exists and is not empty; choose a new directory or pass --overwrite")
    return out_dir


def _publish(staging: Path, out_dir: Path) -> None:
    """Rename staging to out_dir; an existing out_dir is moved aside first and removed only after."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    replaced = out_dir.parent / f".{out_dir.name}.replaced-{os.getpid()}"
    out_dir.rename(replaced)
    staging.rename(out_dir)
    shutil.rmtree(replaced, ignore_errors=True)


def _copy_files(source_dir: Path, dest: Path, names: tuple[str, ...]) -> None:
    """Copy each of names that source_dir has (never a file that resolves outside of it)."""
    for name in names:
        path = resolve_inside(source_dir, name, "file")
        if path.is_file():
            shutil.copy2(path, dest / name)


def _set_config_dtype(model_dir: Path, dtype: torch.dtype | None) -> None:
    """Record a requested dtype in config.json, which from_pretrained(dtype="auto") reads."""
    path = model_dir / "config.json"
    if dtype is None or not path.is_file():
        return
    model_config = json.loads(path.read_text(encoding="utf-8"))
    model_config["dtype"] = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _provenance(run_dir: Path, config: RunConfig, record: dict) -> dict:
    """What dsft_export.json records: where the export came from, the config's fingerprint, what was done, when."""
    from dsft import __version__

    return {
        "run_dir": str(run_dir),
        "config_sha256": hashlib.sha256((run_dir / "config.yaml").read_bytes()).hexdigest(),
        "stage": config.stage,
        "task": config.task,
        "method": config.method.type,
        **record,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dsft_version": __version__,
    }


def _layout_line(record: dict) -> str:
    if record["adapter"] == "separate":
        return f"adapter kept separate, on {record['base_model']}"
    return "adapter merged into its base" if record["adapter"] == "merged" else "full model"


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * dtype.itemsize
