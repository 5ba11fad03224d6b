"""Which weights train: full fine-tuning, a PEFT LoRA adapter, or the top layers only (freeze)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from dsft.config import MethodConfig
from dsft.errors import DsftError
from dsft.models.families import family_of, model_type_of


@dataclass(frozen=True)
class ParamCounts:
    trainable: int
    total: int

    def line(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({share:.2f}%)"


def count_parameters(model) -> ParamCounts:
    from dsft.models.quantize import logical_numel

    params = list(model.parameters())
    return ParamCounts(sum(p.numel() for p in params if p.requires_grad), sum(logical_numel(p) for p in params))


def apply_method(model, method: MethodConfig, task_type: str = "CAUSAL_LM"):
    """Prepare model for method.type; returns the model to train (a PeftModel for lora and qlora).

    task_type is PEFT's: CAUSAL_LM, or SEQ_CLS / TOKEN_CLS for a classifier (its head "score" then trains in full).
    """
    if method.adapter:  # qlora: the base arrives quantized and frozen (models/quantize.py)
        return _apply_lora(model, method, task_type)
    if method.type == "freeze":
        _apply_freeze(model, method.freeze.trainable_layers, method.freeze.train_embeddings)
    return model


def lora_config(method: MethodConfig, task_type: str = "CAUSAL_LM", model_type: str | None = None):
    """PEFT's LoraConfig for method.lora (task_type as in apply_method), for trainers that wrap the model themselves.

    model_type (the model's config.model_type) shapes all-linear for the architectures models/families.py names.
    """
    from peft import LoraConfig

    lora = method.lora
    architecture = {}
    if lora.target_modules == "all-linear":
        family = family_of(model_type)
        if family.lora_exclude is not None:
            architecture["exclude_modules"] = family.lora_exclude
        if family.expert_parameters:
            architecture["target_parameters"] = list(family.expert_parameters)
    modules_to_save = list(lora.modules_to_save)
    if task_type in ("SEQ_CLS", "TOKEN_CLS") and "score" not in modules_to_save:
        modules_to_save.append("score")  # the new head starts random: it must train in full and be saved
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=modules_to_save or None,
        task_type=task_type,
        **architecture,
    )


_FUSED_PATTERN_WARNING = re.compile(r"The following (rank|alpha)_pattern keys did not match any targeted module")


@contextmanager
def fused_expert_patterns() -> Iterator[None]:
    """Around PEFT wrapping a model: every warning passes but PEFT's false one about its own fused-expert patterns.

    dsft sets no rank_pattern or alpha_pattern. Where transformers fuses an MoE layer's expert projections into one
    tensor (DeepSeek-V2/V3's experts.gate_up_proj), PEFT converts the LoRA targets and adds a pattern for that
    tensor, rank and alpha doubled so gate and up keep rank r each; it applies it (the adapter's gate_up factors have
    rank 2r, tests/unit/test_moe_lora.py), then looks for the pattern among adapted modules only, not parameters,
    and warns that it matched nothing, which the user can do nothing about. Dropping the pattern would halve those
    ranks, so only that warning is dropped, here and nowhere else.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        if not (issubclass(warning.category, RuntimeWarning) and _FUSED_PATTERN_WARNING.match(str(warning.message))):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _apply_lora(model, method: MethodConfig, task_type: str):
    from peft import get_peft_model

    peft_config = lora_config(method, task_type, model_type_of(model))
    names = sorted(linear_module_names(model))  # before PEFT wraps them
    try:
        with fused_expert_patterns():
            return get_peft_model(model, peft_config)
    except ValueError as exc:
        reason = str(exc).splitlines()[0]
        if "lora_dropout" in reason:
            # PEFT adapts fused expert tensors as parameters, where dropout on the input cannot be applied.
            raise DsftError(f"method.lora.dropout: must be 0 for this model, whose MoE experts LoRA adapts as fused weights ({reason})") from None
        raise DsftError(f"method.lora.target_modules: {reason}; linear modules of this model: {', '.join(names)}") from None


def linear_module_names(model) -> set[str]:
    """Short names of the model's linear layers (what LoRA target_modules may name)."""
    import torch

    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def decoder_layers(model):
    """The stack of decoder layers (DeepSeek, Qwen2, Llama and most HF causal LMs)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise DsftError(f"method.type freeze: cannot find the decoder layers of {type(model).__name__}")
    return layers


def _apply_freeze(model, trainable_layers: int, train_embeddings: bool) -> None:
    layers = decoder_layers(model)
    if trainable_layers > len(layers):
        raise DsftError(f"method.freeze.trainable_layers: {trainable_layers} but the model has {len(layers)} layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers :]:
        layer.requires_grad_(True)
    # The head and the final norm sit above the top layer, so they train with it.
    head = model.get_output_embeddings()
    (head if head is not None else model.score).requires_grad_(True)  # a classifier's head is "score"
    final_norm = getattr(model.get_decoder(), "norm", None)
    if final_norm is not None:
        final_norm.requires_grad_(True)
    if train_embeddings:
        model.get_input_embeddings().requires_grad_(True)


def train_head_only(model) -> None:
    """Freeze every weight but the classification head ("score", as transformers names it for causal-LM backbones)."""
    head = getattr(model, "score", None)
    if head is None:
        raise DsftError(f"classify.head_only: {type(model).__name__} has no classification head named score")
    model.requires_grad_(False)
    head.requires_grad_(True)
