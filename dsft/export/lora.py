"""What a PEFT LoRA adapter changes in its base, found without loading either: its low-rank updates and full
copies, and where each lands in the base checkpoint's tensors.

PEFT's own module tree, built on the meta device (no memory), says which weight each saved factor pair updates,
with its scaling (alpha / r, or alpha / sqrt(r) with rsLoRA, after rank and alpha patterns) and layout. Three kinds:
  - Linear:       delta_OI = scaling * B_OR @ A_RI (transposed for fan_in_fan_out layers, stored [in, out]);
  - Embedding:    delta_VD = scaling * (B_DR @ A_RV).T;
  - ParamWrapper: a parameter targeted directly (target_parameters), e.g. the fused MoE experts
                  gate_up_proj / down_proj [experts, out, in]. PEFT stores A as [experts * r, in] (rows e*r .. e*r+r-1
                  belong to expert e) and B as [out, r * experts] (column j*experts + e is expert e's j-th), so expert
                  e's delta is scaling * B_e @ A_e, transposed when the stack is stored [experts, in, out].
transformers may store a parameter differently on disk than in the model: DeepSeek's fused experts are saved as one
tensor per expert and projection (experts.{e}.gate_proj.weight, ...), stacked and concatenated on load.
checkpoint_parts() maps each stored tensor to its slice of a model parameter with transformers' own conversion
mapping, so each expert's delta is formed from its factors alone and the expert stack is never formed whole.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dsft.errors import DsftError

PEFT_PREFIX = "base_model.model."
UNSUPPORTED_OPTIONS = ("lora_bias", "trainable_token_indices", "layer_replication", "alora_invocation_tokens")
"""adapter_config.json options whose update is not W + scaling * B @ A (or DoRA's renormalised form); such adapters
are exported unmerged."""


@dataclass(frozen=True)
class LoraUpdate:
    """One LoRA update of a model parameter: the saved factor keys, scaling and how B @ A lays onto the weight."""

    a_key: str
    b_key: str
    scaling: float
    transposed: bool
    """For 2-D weights: the delta is (B @ A).T (embeddings, fan_in_fan_out). For expert stacks: stored [E, in, out]."""
    num_experts: int = 1
    magnitude_key: str | None = None
    """DoRA: the saved magnitude vector m; the merged weight is m * (W + delta) / ||W + delta||, row by row."""


@dataclass(frozen=True)
class CheckpointPart:
    """Where a stored tensor sits in a model parameter: all of it, or expert `expert`'s rows
    [row_offset, row_offset + rows) of a stacked, concatenated parameter; unsupported names why it cannot be mapped."""

    model_key: str
    expert: int | None = None
    row_offset: int = 0
    unsupported: str | None = None


@dataclass
class AdapterUpdates:
    """All an adapter changes: low-rank updates and full copies (modules_to_save, saved embeddings) by model key,
    the meta-device model they were found on with its parameter shapes before PEFT wrapped it, and tied weights
    (tied key -> the key it shares)."""

    lora: dict[str, LoraUpdate]
    copies: dict[str, str]
    meta_model: torch.nn.Module
    model_shapes: dict[str, tuple[int, ...]]
    tied: dict[str, str]

    def touches(self, model_key: str) -> bool:
        return model_key in self.lora or model_key in self.copies


def adapter_updates(adapter_dir: Path, model_config_dir: Path, auto_class, adapter_keys: list[str],
                    trust_remote_code: bool = False) -> AdapterUpdates:
    """The updates of the adapter in adapter_dir (keys adapter_keys) on the model model_config_dir's config.json
    describes, built as auto_class. Raises DsftError for adapter options or layer kinds with another update rule,
    or for saved keys no PEFT layer accounts for."""
    from peft import LoraConfig

    peft_config = LoraConfig.from_pretrained(str(adapter_dir))
    set_options = [name for name in UNSUPPORTED_OPTIONS if getattr(peft_config, name, None)]
    if set_options:
        raise DsftError(f"{adapter_dir}: adapter option {set_options[0]} is set; dsft merges plain LoRA "
                        "(W + scaling * B @ A) only: export without --merge")
    meta_model, model_shapes, peft_model = _peft_on_meta(peft_config, model_config_dir, auto_class, trust_remote_code)
    lora = _lora_updates(peft_model)
    factor_keys = {key for update in lora.values() for key in (update.a_key, update.b_key, update.magnitude_key) if key}
    missing = sorted(factor_keys - set(adapter_keys))
    if missing:
        raise DsftError(f"{adapter_dir}: the adapter has no {missing[0]!r}, which its adapter_config.json implies")
    copies = {model_key(key): key for key in adapter_keys if key not in factor_keys}
    unknown = sorted(key for key in copies.values() if "lora_" in key)
    if unknown:
        raise DsftError(f"{adapter_dir}: adapter tensor {unknown[0]!r} is no plain LoRA factor; export without --merge")
    tied = dict(getattr(meta_model, "all_tied_weights_keys", None) or {})
    return AdapterUpdates(lora, copies, meta_model, model_shapes, tied)


def model_key(peft_key: str) -> str:
    """The base model's name of a PEFT module path or saved key (its prefix and .base_layer parts removed)."""
    return re.sub(r"\.base_layer(?=\.|$)", "", peft_key.removeprefix(PEFT_PREFIX))


def _peft_on_meta(peft_config, model_config_dir: Path, auto_class, trust_remote_code: bool):
    """(base model, its state dict's shapes, PEFT model) on the meta device: module structure only, no weights.
    The base model is the PEFT model's, wrapped in place; the shapes are taken before, under the base's names."""
    from peft import get_peft_model
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(str(model_config_dir), trust_remote_code=trust_remote_code)
    with torch.device("meta"), warnings.catch_warnings():
        # PEFT warns about tied embeddings in the adapter (handled by the merge) and about rank patterns it matched
        # through a parameter name; neither is news to the user here.
        warnings.simplefilter("ignore")
        meta_model = auto_class.from_config(model_config, trust_remote_code=trust_remote_code)
        model_shapes = {key: tuple(value.shape) for key, value in meta_model.state_dict().items()}
        return meta_model, model_shapes, get_peft_model(meta_model, peft_config)


def _lora_updates(peft_model) -> dict[str, LoraUpdate]:
    """The LoRA update of each adapted parameter of peft_model, by its base model key."""
    from peft.tuners.lora.layer import Embedding, Linear, LoraLayer, ParamWrapper

    updates = {}
    for path, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or ("default" not in layer.lora_A and "default" not in layer.lora_embedding_A):
            continue
        scaling = float(layer.scaling["default"])
        if isinstance(layer, ParamWrapper):
            stack = getattr(layer.get_base_layer(), layer.parameter_name)
            transposed = stack.ndim == 3 and bool(getattr(layer.get_base_layer(), "is_transposed", False))
            updates[f"{model_key(path)}.{layer.parameter_name}"] = LoraUpdate(
                f"{path}.lora_A.weight", f"{path}.lora_B.weight", scaling, transposed, layer.num_experts)
        elif isinstance(layer, Embedding):
            updates[f"{model_key(path)}.weight"] = LoraUpdate(
                f"{path}.lora_embedding_A", f"{path}.lora_embedding_B", scaling, transposed=True)
        elif isinstance(layer, Linear):
            dora = bool(layer.use_dora.get("default", False))
            updates[f"{model_key(path)}.weight"] = LoraUpdate(
                f"{path}.lora_A.weight", f"{path}.lora_B.weight", scaling, transposed=bool(layer.fan_in_fan_out),
                magnitude_key=f"{path}.lora_magnitude_vector" if dora else None)
        else:
            raise DsftError(f"LoRA on {model_key(path)} ({type(layer).__name__}) cannot be merged by dsft; "
                            "export without --merge")
    return updates


def checkpoint_parts(stored_shapes: dict[str, tuple[int, ...]], meta_model,
                     model_shapes: dict[str, tuple[int, ...]]) -> dict[str, CheckpointPart]:
    """For each stored tensor (key -> shape): the parameter of meta_model (whose keys model_shapes lists) it loads
    into, with transformers' conversion mapping (renamings, converters that stack experts and concatenate)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(meta_model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    parts = {}
    for key, shape in stored_shapes.items():
        target, pattern = rename_source_key(key, renamings, converters, meta_model.base_model_prefix, model_shapes)
        if target not in model_shapes and key in model_shapes:
            # As transformers' loader does: a key the model already has was not meant for a renaming that fires
            # on it (V4 renames ".norm." to ".kv_norm.", which would also catch the final model.norm).
            target, pattern = rename_source_key(key, [], [], meta_model.base_model_prefix, model_shapes)
        if pattern is None:
            parts[key] = CheckpointPart(target)
        else:
            converter = next(c for c in converters if pattern in c.source_patterns)
            parts[key] = _converted_part(key, shape, target, pattern, converter)
    return parts


def _converted_part(key: str, shape: tuple[int, ...], target: str, pattern: str, converter) -> CheckpointPart:
    """The slice of target that stored tensor key fills, for converters that stack experts along dim 0 and
    concatenate the stored projections along dim 1 (the fused experts of DeepSeek, Qwen-MoE, Mixtral, ...)."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    # Source patterns are regexes whose one wildcard ".*" stands for the expert index (V3: "mlp.experts.*.gate_proj.
    # weight", V4: "\\.experts.*.w1.weight"); the wildcard, read as ".<index>", gives that index.
    wildcard = pattern.count(".*") == 1 and pattern.count("*") == 1
    expert = re.search(pattern.replace(".*", r"\.(\d+)"), key) if wildcard else None
    if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]) or expert is None:
        return CheckpointPart(target, unsupported=f"stored through transformers' {ops} conversion of {pattern!r}")
    # Concatenate(dim=1) joins the projections in source order; transformers splits them back in equal chunks.
    chunk = converter.source_patterns.index(pattern) if len(ops) == 2 else 0
    return CheckpointPart(target, int(expert.group(1)), chunk * shape[0])


def dora_rescaled(update: LoraUpdate, merged: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight from W + delta (float32): each output row scaled to its trained magnitude, as PEFT's
    own merge does (rows are columns of a fan_in_fan_out weight)."""
    rows = merged.T if update.transposed else merged
    scaled = rows * (magnitude.float() / torch.linalg.norm(rows, dim=1)).unsqueeze(1)
    return scaled.T if update.transposed else scaled


def lora_delta(update: LoraUpdate, a: torch.Tensor, b: torch.Tensor, part: CheckpointPart,
               shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 delta update adds to the stored tensor of shape shape that part locates.

    Raises DsftError when the delta does not have that shape (an adapter for another base).
    """
    if update.num_experts == 1:
        delta = update.scaling * (b.float() @ a.float())
        delta = delta.T if update.transposed else delta
    else:
        a_ERI = a.reshape(update.num_experts, -1, a.shape[-1])
        b_ORE = b.reshape(b.shape[0], -1, update.num_experts)
        experts = range(update.num_experts) if part.expert is None else [part.expert]
        # A stored per-expert tensor needs its own expert's factors only: sliced before they are cast to float32.
        deltas = [update.scaling * (b_ORE[:, :, e].float() @ a_ERI[e].float()) for e in experts]
        deltas = [d.T if update.transposed else d for d in deltas]
        delta = deltas[0][part.row_offset: part.row_offset + shape[0]] if part.expert is not None else torch.stack(deltas)
    if tuple(delta.shape) != tuple(shape):
        raise DsftError(f"the adapter's update of {part.model_key} is {tuple(delta.shape)}, the base stores "
                        f"{tuple(shape)}: the adapter was not trained on this base")
    return delta
