"""Load the model and tokenizer a run config names, and load a finished run directory back.

A run directory is plain Hugging Face: a full model (safetensors) or a PEFT adapter, plus the
tokenizer and the resolved config.yaml. A LoRA run on a preset also keeps the random-init base
weights in `base_model/`, because a preset is not on any hub.

A run directory may come from someone else, so loading one reads weights from safetensors only
(unpickling a .bin file can run any code) and no file that resolves outside the directory.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from dsft.config import MethodConfig, ModelConfig, RunConfig, load_config
from dsft.errors import DsftError, RemoteCodeWarning
from dsft.models.auto import HEAD_TASKS, auto_model_class
from dsft.paths import resolve_inside

if TYPE_CHECKING:
    from dsft.models.multitask import MultitaskModel

BASE_MODEL_DIR = "base_model"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


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
    from dsft.data.tokenizer import load_tokenizer, train_bpe_tokenizer

    _warn_remote_code(model)
    token = hub_token(model)
    if model.tokenizer is not None:
        name = model.tokenizer
        return _guarded(lambda: load_tokenizer(name, model.trust_remote_code, token=token), "model.tokenizer", name)
    if model.name_or_path is not None:
        name, revision = model.name_or_path, model.revision
        return _guarded(lambda: load_tokenizer(name, model.trust_remote_code, revision, token), "model.name_or_path", name)
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
        return _never_padded(with_attention(build_preset(model.preset, tokenizer, seed, dtype), model))
    loaded = _guarded(lambda: _from_pretrained(model, dtype), "model.name_or_path", model.name_or_path)
    if len(tokenizer) > loaded.get_input_embeddings().weight.shape[0]:
        loaded.resize_token_embeddings(len(tokenizer))
    return _never_padded(loaded)


def build_quantized(model: ModelConfig, tokenizer, method: MethodConfig, source: Path | None = None,
                    task: str = "causal_lm", **extra):
    """The frozen, quantized base of method.type qlora (models/quantize.py), ready for an adapter: pretrained weights
    of model.name_or_path, or of source (a preset's saved base_model/); extra goes to from_pretrained (labels)."""
    from dsft.models.quantize import prepare_for_training, quantization_kwargs

    dtype = resolve_dtype(model.dtype)
    origin = model if source is None else model.model_copy(update={"name_or_path": str(source), "preset": None,
                                                                   "revision": None})
    quantized = quantization_kwargs(method, dtype, task)
    loaded = _guarded(lambda: _from_pretrained(origin, dtype, task, **quantized, **extra),
                      "model.name_or_path", str(origin.name_or_path))
    if len(tokenizer) > loaded.get_input_embeddings().weight.shape[0]:
        loaded.resize_token_embeddings(len(tokenizer))  # embeddings are never quantized
    if task != "causal_lm":
        loaded.config.pad_token_id = tokenizer.pad_token_id  # a classifier pools the last token that is not padding
    return _never_padded(prepare_for_training(loaded))


def _never_padded(model):
    """model, run unpadded where its architecture must never see padding (models/unpadded.py)."""
    from dsft.models.unpadded import guard_padding

    return guard_padding(model)


def attention_name(model: ModelConfig) -> str | None:
    """model.attn_implementation as transformers names it; dsft's varlen is registered with transformers first."""
    if model.attn_implementation == "varlen":
        from dsft.models.varlen_attention import register_varlen_attention

        return register_varlen_attention()
    return model.attn_implementation


def with_attention(built, model: ModelConfig):
    """built (a model made from config, e.g. a preset) with model.attn_implementation set, if the config sets one."""
    if model.attn_implementation is not None:
        built.set_attn_implementation(attention_name(model))
    return built


def hub_token(model: ModelConfig) -> str | None:
    """The model.hub_token value for from_pretrained; None lets huggingface_hub use its own login."""
    return None if model.hub_token is None else model.hub_token.get_secret_value()


def _warn_remote_code(model: ModelConfig) -> None:
    """Before anything loads: name the repositories whose code trust_remote_code lets run here."""
    names = [n for n in (model.name_or_path, model.tokenizer) if n is not None]
    if not (model.trust_remote_code and names):
        return
    if model.revision is not None:
        names[0] = f"{names[0]} (revision {model.revision})"
    repositories = " and ".join(dict.fromkeys(names))
    # One location and one text, so Python's default filter shows it once per process.
    warnings.warn(
        f"model.trust_remote_code is true: Python code from {repositories} runs on this machine with "
        "your permissions; set it only for repositories whose code you have read",
        RemoteCodeWarning,
    )


def _from_pretrained(model: ModelConfig, dtype, task: str = "causal_lm", **extra):
    """Pretrained weights of model.name_or_path for task; extra goes to from_pretrained (e.g. num_labels)."""
    _warn_remote_code(model)
    kwargs = dict(
        dtype=dtype, trust_remote_code=model.trust_remote_code, revision=model.revision, token=hub_token(model)
    )
    if model.attn_implementation is not None:
        kwargs["attn_implementation"] = attention_name(model)
    return auto_model_class(task).from_pretrained(model.name_or_path, **kwargs, **extra)


def build_classifier(model: ModelConfig, tokenizer, seed: int, labels: list[str], task: str = "classification"):
    """A classifier for task (a HEAD_TASKS entry) with one output per label: a preset built from config, or
    pretrained weights with a new head. pad_token_id is set: a sequence classifier pools the last token
    that is not padding."""
    from dsft.models.presets import build_preset_classifier

    dtype = resolve_dtype(model.dtype)
    if model.preset is not None:
        classifier = with_attention(build_preset_classifier(model.preset, tokenizer, seed, dtype, labels, task), model)
    else:
        label_kwargs = classifier_kwargs(labels, tokenizer)
        classifier = _guarded(lambda: _from_pretrained(model, dtype, task, **label_kwargs),
                              "model.name_or_path", model.name_or_path)
        if len(tokenizer) > classifier.get_input_embeddings().weight.shape[0]:
            classifier.resize_token_embeddings(len(tokenizer))
    classifier.config.pad_token_id = tokenizer.pad_token_id
    return _never_padded(classifier)


def classifier_kwargs(labels: list[str], tokenizer) -> dict:
    """from_pretrained arguments that give a model a classifier head with one output per label."""
    return dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id)


def _guarded(load: Callable, key: str, value: str):
    """Turn a loading failure (missing dir, unreachable hub, bad files) into a user error naming the key."""
    try:
        return load()
    except (OSError, ValueError) as exc:
        hint = "" if Path(value).exists() else " (not a local directory; no model hub may be reachable: use a local path)"
        raise DsftError(f"{key}: cannot load {value!r}{hint}: {str(exc).splitlines()[0]}") from None


def load_run(run_dir: str | Path, dtype: str = "auto"):
    """Load a finished run directory: (model in eval mode, tokenizer, resolved config).

    Raises DsftError for a directory that is not a run, and as load_run_model does.
    """
    from transformers.utils import logging as hf_logging

    from dsft.data.tokenizer import load_tokenizer

    hf_logging.disable_progress_bar()  # a weight-loading bar would interleave with chat output
    run_dir = Path(run_dir).resolve()
    config_path = resolve_inside(run_dir, "config.yaml", "run config")
    if not config_path.is_file():
        raise DsftError(f"{run_dir}: not a dsft run directory (no config.yaml)")
    config = load_config(config_path)
    tokenizer = load_tokenizer(run_dir)
    if config.task == "multitask":
        model = load_multitask_run(run_dir, config, dtype)  # a backbone with its own heads, no single HF class
    else:
        model = load_run_model(run_dir, config, dtype)
    model.eval()
    return model, tokenizer, config


def build_backbone(model_config, tokenizer, seed: int):
    """The base model (no LM head) of the configured causal LM: a preset built from config, or pretrained
    weights; raises DsftError as load.build_model does."""
    causal_lm = build_model(model_config, tokenizer, seed)
    return causal_lm.base_model  # e.g. Qwen2Model under Qwen2ForCausalLM; the LM head is dropped


def read_multitask_description(run_dir: Path) -> dict:
    """multitask.json of a run; raises DsftError when it is missing or resolves outside the run."""
    from dsft.models.multitask import MULTITASK_FILE

    path = resolve_inside(run_dir, MULTITASK_FILE, "multitask description")
    if not path.is_file():
        raise DsftError(f"{run_dir}: no {MULTITASK_FILE}; not a complete multitask run directory")
    return json.loads(path.read_text(encoding="utf-8"))


def load_multitask_run(run_dir: str | Path, config, dtype: str = "auto") -> MultitaskModel:
    """A multitask run's model from its directory (safetensors only), in eval mode.

    Raises DsftError for missing files, pickled weights, a file outside the run, or heads that do not
    match multitask.json.
    """
    from safetensors.torch import load_file

    from dsft.models.multitask import HEADS_FILE, MULTITASK_FILE, HeadSpec, MultitaskModel

    run_dir = Path(run_dir).resolve()
    description = read_multitask_description(run_dir)
    heads = [HeadSpec(**head) for head in description["heads"]]
    backbone = _load_backbone(run_dir, config, dtype)
    model = MultitaskModel(backbone, heads, description.get("pad_token_id"))
    heads_path = resolve_inside(run_dir, HEADS_FILE, "heads weights")
    if not heads_path.is_file():
        raise DsftError(f"{run_dir}: no {HEADS_FILE}; not a complete multitask run directory")
    try:
        model.heads.load_state_dict(load_file(str(heads_path)), strict=True)
    except RuntimeError as exc:
        raise DsftError(f"{heads_path}: does not match the heads of {MULTITASK_FILE}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def _load_backbone(run_dir: Path, config, dtype: str):
    """The full backbone, or the adapter on its base (the run's base_model/ or model.name_or_path)."""
    from transformers import AutoModel

    def hub_base(model_config, torch_dtype):
        return _from_pretrained(model_config, torch_dtype).base_model  # the causal LM's body, as trained

    return _never_padded(_full_or_adapter(Path(run_dir).resolve(), config, dtype, AutoModel, hub_base))


def load_run_model(run_dir: Path, config: RunConfig, dtype: str = "auto"):
    """The run's full model, or its adapter on the base it was trained on, from safetensors only.

    Raises DsftError for pickled weights, a file that resolves outside the run directory, or an
    adapter whose recorded base is neither the run's base_model/ nor the model its config names.
    """
    run_dir = Path(run_dir).resolve()
    task = run_task(config)

    def hub_base(model_config, torch_dtype, **quantized):
        labels = _run_labels(run_dir) if task in HEAD_TASKS else {}
        return _from_pretrained(model_config, torch_dtype, task, **labels, **quantized)

    return _never_padded(_full_or_adapter(run_dir, config, dtype, auto_model_class(task), hub_base))


def _full_or_adapter(run_dir: Path, config: RunConfig, dtype: str, auto_class, hub_base: Callable):
    """A run's full weights, or its adapter on its base: the run's own base_model/, else the hub model
    its config names (hub_base(model_config, torch_dtype) builds it), never any other."""
    from dsft.models.quantize import one_cpu_path, quantization_kwargs

    torch_dtype = resolve_dtype(dtype)
    adapter_config = resolve_inside(run_dir, ADAPTER_CONFIG_FILE, "adapter config")
    if not adapter_config.is_file():
        _require_safetensors(run_dir, run_dir, "model")
        return auto_class.from_pretrained(run_dir, dtype=torch_dtype, use_safetensors=True)
    from peft import PeftModel

    _require_safetensors(run_dir, run_dir, "adapter_model")
    recorded = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    name = config.model.name_or_path
    # A qlora adapter runs on the base it trained on (a classifier's head unquantized, as it trained).
    quantized = quantization_kwargs(config.method, torch_dtype, run_task(config))
    if os.path.lexists(run_dir / BASE_MODEL_DIR):
        base_dir = _own_base_dir(run_dir, recorded, adapter_config)
        base = auto_class.from_pretrained(base_dir, dtype=torch_dtype, use_safetensors=True, **quantized)
    elif name is not None and recorded in (None, name):
        model_config = config.model.model_copy(update={"dtype": dtype})
        base = _guarded(lambda: hub_base(model_config, torch_dtype, **quantized), "model.name_or_path", str(name))
    else:
        raise DsftError(
            f"{adapter_config}: base_model_name_or_path {recorded!r} is neither this run's {BASE_MODEL_DIR}/ "
            f"nor model.name_or_path of its config.yaml ({name!r}); no other base is loaded"
        )
    from dsft.models.method import fused_expert_patterns

    with fused_expert_patterns():  # PEFT re-adds its fused-expert rank pattern on load, and warns of it again
        return PeftModel.from_pretrained(one_cpu_path(base), run_dir)


def run_task(config: RunConfig) -> str:
    """The task whose model class a run directory holds: a reward model (stage reward) is a one-output classifier."""
    return "classification" if config.stage == "reward" else config.task


def _run_labels(run_dir: Path) -> dict:
    """from_pretrained arguments that give a hub base the run's classifier head shape and labels (config.json)."""
    path = resolve_inside(run_dir, "config.json", "model config")
    if not path.is_file():
        raise DsftError(f"{run_dir}: no config.json with the labels (id2label) of this classification run")
    model_config = json.loads(path.read_text(encoding="utf-8"))
    id2label = {int(i): label for i, label in model_config["id2label"].items()}
    return dict(num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
                pad_token_id=model_config.get("pad_token_id"))


def _own_base_dir(run_dir: Path, recorded: str | None, adapter_config: Path) -> Path:
    """The run's base_model/ (inside the run, safetensors), which the adapter must record as its base."""
    base_dir = resolve_inside(run_dir, BASE_MODEL_DIR, "base model directory")
    # A run moved with its base_model/ still records the old absolute path, which ends the same.
    if recorded is not None and Path(recorded).name != BASE_MODEL_DIR:
        raise DsftError(
            f"{adapter_config}: base_model_name_or_path {recorded!r} is not this run's {BASE_MODEL_DIR}/, "
            "which holds the base it was trained on; no other base is loaded"
        )
    _require_safetensors(base_dir, run_dir, "model")
    return base_dir


def _require_safetensors(directory: Path, run_dir: Path, stem: str) -> None:
    """Check that directory holds stem*.safetensors, all inside run_dir; raises DsftError naming pickled weights."""
    weights = sorted(directory.glob(f"{stem}*.safetensors")) + sorted(directory.glob(f"{stem}*.safetensors.index.json"))
    if not weights:
        pickled = sorted(p for p in directory.glob(f"*{stem}*") if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise DsftError(
                f"{pickled[0]}: pickled weights are not loaded (unpickling can run arbitrary code); "
                f"dsft loads weights only from safetensors ({stem}.safetensors)"
            )
        raise DsftError(f"{directory}: no {stem}.safetensors; not a complete dsft run directory")
    for path in weights:
        resolve_inside(run_dir, path, "weights file")
