"""Merge a LoRA adapter into its base, streaming: each base tensor is read, has its update added, and is written
in turn, so the merge holds one tensor (and maps the one input file it reads), never the model.

Every stored tensor keeps its name, shape and place in the checkpoint's format (DeepSeek's routed experts stay one
tensor per expert and projection, as vLLM and transformers read them), with
    W' = W + scaling * B @ A    computed in float32, then cast back to W's dtype (or the requested one),
a full copy from the adapter where it holds one (modules_to_save such as a classifier's score, saved embeddings),
and tensors the model class does not have dropped (a causal LM's lm_head under a new classification head).
Tied embeddings that the adapter changes on one side are untied: both tensors are written and config.json says
tie_word_embeddings false, so the merged model computes what the adapter did (PEFT's own merge_and_unload would
add the update to both sides).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsft.errors import DsftError
from dsft.export.lora import (
    AdapterUpdates,
    CheckpointPart,
    LoraUpdate,
    adapter_updates,
    checkpoint_parts,
    dora_rescaled,
    lora_delta,
)
from dsft.export.weights import PlannedTensor, StoredTensor, TensorReader, output_dtype, read_index

ADAPTER_STEM = "adapter_model"
_FACTOR_CACHE_SIZE = 4
"""Factor pairs kept read: consecutive stored experts alternate between two or three pairs (gate_up, down)."""


@dataclass
class MergePlan:
    """The merged model's tensors in output order, and what the merge changed beside the weights."""

    tensors: list[PlannedTensor]
    untied: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


class MergeSources:
    """Readers of the base weights and of the adapter file; close() releases both (use with contextlib.closing)."""

    def __init__(self, adapter_dir: Path):
        self.base = TensorReader()
        self._adapter_file = adapter_dir / f"{ADAPTER_STEM}.safetensors"
        self._adapter = None
        self._factors: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def adapter_tensor(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if self._adapter is None:
            self._adapter = safe_open(self._adapter_file, framework="pt")
        return self._adapter.get_tensor(key)

    def factors(self, update: LoraUpdate) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of update, read once while the few pairs in use stay cached."""
        if update.a_key not in self._factors:
            self._factors[update.a_key] = (self.adapter_tensor(update.a_key), self.adapter_tensor(update.b_key))
            if len(self._factors) > _FACTOR_CACHE_SIZE:
                self._factors.popitem(last=False)
        self._factors.move_to_end(update.a_key)
        return self._factors[update.a_key]

    def close(self) -> None:
        self.base.close()
        self._adapter = None
        self._factors.clear()


def plan_merge(base_dir: Path, adapter_dir: Path, model_config_dir: Path, auto_class, sources: MergeSources,
               dtype: torch.dtype | None = None, trust_remote_code: bool = False,
               rebuilt: dict[str, Callable] | None = None) -> MergePlan:
    """The merged model's tensors (base_dir's weights with adapter_dir's adapter merged in), read through sources
    when written; model_config_dir holds the config.json of the model the run trained (auto_class). rebuilt maps
    stored keys to the function that turns the stored weight into the one training computed with (a qlora base's
    quantized weights, dequantized); the update is added to that, and it is written in the stored dtype.

    Raises DsftError, before anything is written, for an update that cannot be placed in the base's tensors, a
    copy or update whose shape differs from the base's, or an update of a non-float weight.
    """
    stored = read_index(base_dir)
    adapter = read_index(adapter_dir, ADAPTER_STEM)
    updates = adapter_updates(adapter_dir, model_config_dir, auto_class, list(adapter), trust_remote_code)
    meta_shapes = updates.model_shapes
    parts = checkpoint_parts({key: item.shape for key, item in stored.items()}, updates.meta_model, meta_shapes)
    plan = MergePlan([], dropped=[key for key in stored if parts[key].model_key not in meta_shapes])
    placed: dict[str, list[tuple[StoredTensor, CheckpointPart]]] = {}
    for key, item in stored.items():
        if key not in plan.dropped:
            placed.setdefault(parts[key].model_key, []).append((item, parts[key]))
            plan.tensors.append(_merged_tensor(item, parts[key], updates, adapter, sources, dtype,
                                               (rebuilt or {}).get(key)))
    plan.untied = _untie(updates, placed, plan, adapter, sources, dtype)
    for key, adapter_key in updates.copies.items():
        if key not in placed:  # a new head (score) on a base that has none
            copy = adapter[adapter_key]
            if meta_shapes.get(key) != copy.shape:
                raise DsftError(f"{adapter_dir}: the adapter holds {key} {copy.shape}, which the model does not have")
            item = StoredTensor(key, copy.file, copy.shape, copy.dtype)
            plan.tensors.append(_merged_tensor(item, CheckpointPart(key), updates, adapter, sources, dtype))
            placed[key] = [(item, CheckpointPart(key))]
    _check_coverage(updates, placed, meta_shapes)
    return plan


def _merged_tensor(item: StoredTensor, part: CheckpointPart, updates: AdapterUpdates, adapter: dict,
                   sources: MergeSources, dtype: torch.dtype | None, rebuild: Callable | None = None) -> PlannedTensor:
    """The output tensor of one stored tensor: read as is, or taken from the adapter's copy, plus its LoRA update."""
    update, copy_key = updates.lora.get(part.model_key), updates.copies.get(part.model_key)
    out_dtype = output_dtype(item.dtype, dtype)
    if (update is not None or copy_key is not None) and part.unsupported is not None:
        raise DsftError(f"{item.key}: the adapter changes {part.model_key}, which is {part.unsupported}; "
                        "dsft cannot merge it tensor by tensor: export without --merge")
    if copy_key is not None and (part.expert is not None or adapter[copy_key].shape != item.shape):
        raise DsftError(f"the adapter's copy of {part.model_key} is {adapter[copy_key].shape}, the base stores "
                        f"{item.key} as {item.shape}: the adapter was not trained on this base")
    if update is not None and not (item.dtype.is_floating_point and item.dtype.itemsize > 1):
        raise DsftError(f"{item.key} is stored as {item.dtype}; dsft merges into float16/bfloat16/float32 weights "
                        "only (dequantize the base first, or export without --merge)")

    def produce() -> torch.Tensor:
        weight = sources.adapter_tensor(copy_key) if copy_key is not None else sources.base.read(item.file, item.key)
        if rebuild is not None and copy_key is None:
            weight = rebuild(weight)
        if update is not None:
            a, b = sources.factors(update)
            weight = weight.float() + lora_delta(update, a, b, part, item.shape)
            if update.magnitude_key is not None:
                weight = dora_rescaled(update, weight, sources.adapter_tensor(update.magnitude_key))
        return weight.to(out_dtype)

    return PlannedTensor(item.key, item.shape, out_dtype, produce)


def _untie(updates: AdapterUpdates, placed: dict, plan: MergePlan, adapter: dict, sources: MergeSources,
           dtype: torch.dtype | None) -> list[str]:
    """Untie each tied pair the adapter changes: the tied key the checkpoint leaves out is written from the tensor
    it shares, with its own updates. Returns the keys written so."""
    untied = []
    for tied_key, shared_key in updates.tied.items():
        if not (updates.touches(tied_key) or updates.touches(shared_key)) or tied_key in placed:
            continue
        if len(placed.get(shared_key, [])) != 1:
            raise DsftError(f"the adapter changes tied weights {tied_key} / {shared_key}, and the base checkpoint does "
                            f"not store {shared_key} as one tensor; export without --merge")
        (item, _), = placed[shared_key]
        tensor = _merged_tensor(item, CheckpointPart(tied_key), updates, adapter, sources, dtype)
        plan.tensors.append(PlannedTensor(tied_key, tensor.shape, tensor.dtype, tensor.produce))
        placed[tied_key] = [(item, CheckpointPart(tied_key))]
        untied.append(tied_key)
    return untied


def _check_coverage(updates: AdapterUpdates, placed: dict, meta_shapes: dict) -> None:
    """Every LoRA update lands on stored tensors that together are its whole parameter (each expert of a stack)."""
    for key in updates.lora:
        stored_numel = sum(_numel(item.shape) for item, _ in placed.get(key, []))
        if key not in meta_shapes or stored_numel != _numel(meta_shapes[key]):
            raise DsftError(f"the adapter updates {key}, which the base checkpoint does not store whole "
                            f"({stored_numel} of {_numel(meta_shapes.get(key, ()))} values found); export without --merge")


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())
