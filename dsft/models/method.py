"""Which weights train: full fine-tuning, a PEFT LoRA adapter, or the top layers only (freeze)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from dsft.config import MethodConfig
from dsft.errors import DsftError
from dsft.models.families import family_of, linear_module_names, model_type_of


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
        model = _apply_adapter(model, method, task_type)
    elif method.type == "freeze":
        _apply_freeze(model, method.freeze.trainable_layers, method.freeze.train_embeddings)
    apply_router_policy(model, method)
    return model


def apply_router_policy(model, method: MethodConfig) -> None:
    """method.moe.router freeze: the routers' gate weights stop training (a modules_to_save copy that only
    carries the correction bias included); train leaves them as the method made them."""
    from dsft.models.moe import find_routers
    from dsft.models.moe_targets import freeze_routers

    if method.moe.router_for(method.type) == "freeze":
        freeze_routers(model, find_routers(model))


def lora_config(method: MethodConfig, task_type: str = "CAUSAL_LM", model_type: str | None = None, model=None):
    """PEFT's LoraConfig for method.lora (task_type as in apply_method), for trainers that wrap the model themselves.

    model_type (the model's config.model_type) shapes all-linear for the architectures models/families.py names; with
    model, an MoE model's targets and routers follow method.moe (models/moe_targets.py).
    """
    from peft import LoraConfig

    lora = method.lora
    architecture = _architecture_targets(method, model_type, model)
    extra_saved = architecture.pop("extra_modules_to_save", [])
    ranks, alphas = architecture.pop("moe_ranks", {}), architecture.pop("moe_alphas", {})
    architecture.setdefault("target_modules", lora.target_modules)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        modules_to_save=_modules_to_save([*lora.modules_to_save, *extra_saved], task_type),
        task_type=task_type,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        # loftq is fitted after wrapping (initialise_adapter), from the base's own weights: PEFT starts from B = 0.
        init_lora_weights=INITS[lora.init],
        rank_pattern={**ranks, **lora.rank_pattern},
        alpha_pattern={**alphas, **lora.alpha_pattern},
        **architecture,
    )


def _architecture_targets(method: MethodConfig, model_type: str | None, model) -> dict:
    """The LoraConfig arguments an architecture adds: MoE targets from method.moe where the model is known and has
    routers, else the family's exclusions and expert parameters for all-linear."""
    family = family_of(model_type)
    if model is not None:
        from dsft.models.moe_targets import moe_lora_arguments

        arguments = moe_lora_arguments(method, model, family.lora_exclude)
        if arguments:
            return arguments
    architecture = {}
    if method.lora.target_modules == "all-linear":
        if family.lora_exclude is not None:
            architecture["exclude_modules"] = family.lora_exclude
        if family.expert_parameters:
            architecture["target_parameters"] = list(family.expert_parameters)
    return architecture


INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True}
"""method.lora.init as PEFT's init_lora_weights."""


def _modules_to_save(names: list[str], task_type: str) -> list[str] | None:
    names = list(names)
    if task_type in ("SEQ_CLS", "TOKEN_CLS") and "score" not in names:
        names.append("score")  # the new head starts random: it must train in full and be saved
    return names or None


def peft_config(method: MethodConfig, task_type: str = "CAUSAL_LM", model_type: str | None = None, model=None):
    """PEFT's config of an adapter method (lora, qlora, prefix, ia3), for apply_method and the trainers that wrap
    the model themselves (TRL's); model (the one to wrap) lets an MoE model's targets follow method.moe."""
    if method.lora_family:
        return lora_config(method, task_type, model_type, model)
    from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig

    if method.type == "ia3":
        ia3 = method.ia3
        return IA3Config(target_modules=list(ia3.target_modules), feedforward_modules=list(ia3.feedforward_modules),
                         modules_to_save=_modules_to_save([], task_type), task_type=task_type)
    prefix = method.prefix
    if prefix.kind == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=prefix.num_virtual_tokens, prefix_projection=prefix.projection,
                                  task_type=task_type)
    return PromptTuningConfig(num_virtual_tokens=prefix.num_virtual_tokens, task_type=task_type)


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


def _apply_adapter(model, method: MethodConfig, task_type: str):
    from peft import get_peft_model

    config = peft_config(method, task_type, model_type_of(model), model)
    refuse_adapter(method, model)
    names = sorted(linear_module_names(model))  # before PEFT wraps them
    try:
        with fused_expert_patterns():
            wrapped = get_peft_model(model, config)
    except (ValueError, NotImplementedError, TypeError) as exc:
        raise adapter_error(exc, method, names) from None
    check_patterns(wrapped, method)
    return wrapped


MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4")
"""DeepSeek's multi-head latent attention: keys and values come from one compressed projection, whose cache PEFT's
prefix tuning cannot extend with its per-head prefix (the shapes differ)."""


def refuse_adapter(method: MethodConfig, model) -> None:
    """Raise DsftError, before PEFT wraps model, for the combinations of method and architecture PEFT cannot train
    (its own errors there are an AttributeError deep inside, or a shape mismatch at the first forward)."""
    model_type = model_type_of(model)
    # Fused MoE experts (3D weights), which LoRA all-linear reaches as parameters (PEFT's ParamWrapper).
    experts = method.lora.target_modules == "all-linear" and any(p.ndim == 3 for p in model.parameters())
    if method.type == "prefix" and method.prefix.kind == "prefix" and model_type in MLA_MODEL_TYPES:
        raise DsftError(f"method.prefix.kind prefix: {model_type}'s multi-head latent attention caches compressed keys "
                        "and values, which PEFT's prefix tuning cannot extend; use kind prompt (prompt tuning)")
    if method.lora_family and experts and method.lora.init in ("pissa", "olora"):
        raise DsftError(f"method.lora.init {method.lora.init}: PEFT initialises so only nn.Linear weights, and "
                        f"all-linear adapts this model's fused MoE experts as parameters; name the linear modules in "
                        f"method.lora.target_modules (e.g. q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj)")
    if method.lora_family and experts and method.lora.use_dora:
        raise DsftError("method.lora.use_dora: PEFT's DoRA works on nn.Linear layers, and all-linear adapts this "
                        "model's fused MoE experts as parameters; name the linear modules in method.lora.target_modules "
                        "(e.g. q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj)")


def adapter_error(exc: Exception, method: MethodConfig, linear_names: list[str]) -> DsftError:
    """PEFT's refusal to wrap a model, as a DsftError naming the config key it concerns."""
    reason = str(exc).splitlines()[0]
    if "lora_dropout" in reason:
        # PEFT adapts fused expert tensors as parameters, where dropout on the input cannot be applied.
        return DsftError(f"method.lora.dropout: must be 0 for this model, whose MoE experts LoRA adapts as fused "
                         f"weights ({reason})")
    if "dora" in reason.lower():
        return DsftError(f"method.lora.use_dora: {reason}")
    key = {"ia3": "method.ia3.target_modules", "prefix": "method.prefix"}.get(method.type, "method.lora.target_modules")
    return DsftError(f"{key}: {reason}; linear modules of this model: {', '.join(linear_names)}")


def check_patterns(wrapped, method: MethodConfig) -> None:
    """Raise DsftError for a method.lora.rank_pattern or alpha_pattern key that matches no adapted module (PEFT
    only warns, and dsft keeps that warning back for its own fused-expert patterns, fused_expert_patterns)."""
    if not method.lora_family:
        return
    from peft.tuners.lora.layer import LoraLayer

    adapted = [name for name, module in wrapped.named_modules() if isinstance(module, LoraLayer)]
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(method.lora, field):
            if not any(re.fullmatch(rf"(.*\.)?{key}", name) for name in adapted):
                short = sorted({name.rsplit(".", 1)[-1] for name in adapted})
                raise DsftError(f"method.lora.{field}.{key}: matches no adapted module; adapted: {', '.join(short)}")


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
