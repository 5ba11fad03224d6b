"""Load the model and tokenizer a run config names, and load a finished run directory back.

A run directory is plain Hugging Face: a full model (safetensors) or a PEFT adapter, plus the
tokenizer and the resolved config.yaml. A LoRA run on a preset also keeps the random-init base
weights in `base_model/`, because a preset is not on any hub.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from dsft.config import ModelConfig, RunConfig, load_config
from dsft.errors import DsftError

BASE_MODEL_DIR = "base_model"


def resolve_dtype(name: str):
    """torch dtype for model.dtype; auto means bf16 where CUDA supports it, else fp32."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def has_tokenizer_files(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file()


def build_tokenizer(model: ModelConfig, run_dir: Path, training_texts: Callable[[], Iterable[str]]):
    """The run's tokenizer: the configured one, the model's own, or (presets) one trained on the data.

    A trained tokenizer is saved into the run directory at once, so a resumed run reuses it.
    """
    from dsft.models.tokenizer import load_tokenizer, train_bpe_tokenizer

    if model.tokenizer is not None:
        return _guarded(lambda: load_tokenizer(model.tokenizer, model.trust_remote_code), "model.tokenizer", model.tokenizer)
    if model.name_or_path is not None:
        name = model.name_or_path
        return _guarded(lambda: load_tokenizer(name, model.trust_remote_code, model.revision), "model.name_or_path", name)
    if has_tokenizer_files(run_dir):
        return load_tokenizer(run_dir)
    tokenizer = train_bpe_tokenizer(training_texts(), model.tokenizer_vocab_size)
    tokenizer.save_pretrained(run_dir)
    return tokenizer


def build_model(model: ModelConfig, tokenizer, seed: int):
    """The model to fine-tune: a preset built from config, or pretrained weights (hub id or local dir)."""
    from dsft.models.presets import build_preset

    dtype = resolve_dtype(model.dtype)
    if model.preset is not None:
        return build_preset(model.preset, tokenizer, seed, dtype)
    loaded = _guarded(lambda: _from_pretrained(model, dtype), "model.name_or_path", model.name_or_path)
    if len(tokenizer) > loaded.get_input_embeddings().weight.shape[0]:
        loaded.resize_token_embeddings(len(tokenizer))
    return loaded


def _from_pretrained(model: ModelConfig, dtype):
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, trust_remote_code=model.trust_remote_code, revision=model.revision)
    if model.attn_implementation is not None:
        kwargs["attn_implementation"] = model.attn_implementation
    return AutoModelForCausalLM.from_pretrained(model.name_or_path, **kwargs)


def _guarded(load: Callable, key: str, value: str):
    """Turn a loading failure (missing dir, unreachable hub, bad files) into a user error naming the key."""
    try:
        return load()
    except (OSError, ValueError) as exc:
        hint = "" if Path(value).exists() else " (not a local directory; no model hub may be reachable: use a local path)"
        raise DsftError(f"{key}: cannot load {value!r}{hint}: {str(exc).splitlines()[0]}") from None


def load_run(run_dir: str | Path, dtype: str = "auto"):
    """Load a finished run directory: (model in eval mode, tokenizer, resolved config)."""
    from transformers.utils import logging as hf_logging

    from dsft.models.tokenizer import load_tokenizer

    hf_logging.disable_progress_bar()  # a weight-loading bar would interleave with chat output
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise DsftError(f"{run_dir}: not a dsft run directory (no config.yaml)")
    config = load_config(config_path)
    tokenizer = load_tokenizer(run_dir)
    model = load_run_model(run_dir, config, dtype)
    model.eval()
    return model, tokenizer, config


def load_run_model(run_dir: Path, config: RunConfig, dtype: str = "auto"):
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    if not (run_dir / "adapter_config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch_dtype)
    from peft import PeftModel

    base_dir = run_dir / BASE_MODEL_DIR
    if base_dir.is_dir():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype)
    else:
        base = _guarded(
            lambda: _from_pretrained(config.model.model_copy(update={"dtype": dtype}), torch_dtype),
            "model.name_or_path",
            str(config.model.name_or_path),
        )
    return PeftModel.from_pretrained(base, run_dir)
