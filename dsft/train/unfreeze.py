"""Progressive unfreezing: the head trains first, then more and more top decoder layers from scheduled steps.

The Trainer builds its optimizer once, from the parameters that require grad at that moment, so every
parameter that will ever train stays trainable until training starts (the method decides which: all of
them for full, the LoRA weights and modules_to_save for lora). The callback then freezes what is not yet
due: a frozen parameter gets no gradient, and AdamW skips a parameter without gradient, so neither its
moments nor weight decay touch it until its step comes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from transformers import TrainerCallback

from dsft.config import UnfreezeStep
from dsft.errors import DsftError
from dsft.models.method import decoder_layers

LayersSpec = int | str
"""Top decoder layers that train: a count, or "all" (every layer and the input embeddings)."""


@dataclasses.dataclass(frozen=True)
class ParameterGroups:
    """The parameters that will ever train, by where they sit in the model."""

    head: list
    """Above the top layer (lm_head or score, the final norm, modules_to_save): they train from the start."""
    layers: list[list]
    """Per decoder layer, bottom layer first."""
    embeddings: list
    """The input embeddings (when they train at all and are not tied to the head)."""
    has_head: bool
    """Whether head holds more than the final norm (LoRA of a causal LM leaves lm_head frozen)."""
    has_final_norm: bool
    """Whether the final norm is in head (full fine-tuning; LoRA leaves it frozen)."""

    def trainable(self, layer_indices: Sequence[int], with_embeddings: bool) -> list:
        chosen = [p for i in layer_indices for p in self.layers[i]]
        return self.head + chosen + (self.embeddings if with_embeddings else [])

    def everything(self) -> list:
        return self.head + [p for layer in self.layers for p in layer] + self.embeddings


def parameter_groups(model) -> ParameterGroups:
    """Group the parameters that require grad now (call it before training freezes any of them). model is a
    transformers model (PEFT-wrapped or not) or a composed one whose transformer is its .backbone (multitask)."""
    transformer = model if hasattr(model, "get_input_embeddings") else model.backbone
    layer_of = {id(p): i for i, layer in enumerate(decoder_layers(transformer)) for p in layer.parameters()}
    head_ids = _ids(transformer.get_output_embeddings())  # a head tied to the embeddings is the head
    embedding_ids = _ids(transformer.get_input_embeddings()) - head_ids
    norm_ids = _ids(getattr(transformer.get_decoder(), "norm", None))
    head, embeddings = [], []
    layers = [[] for _ in decoder_layers(transformer)]
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in layer_of:
            layers[layer_of[id(param)]].append(param)
        else:
            (embeddings if id(param) in embedding_ids else head).append(param)
    norm_count = sum(id(p) in norm_ids for p in head)
    return ParameterGroups(head, layers, embeddings, len(head) > norm_count, norm_count > 0)


def _ids(module) -> set[int]:
    return set() if module is None else {id(p) for p in module.parameters()}


def layers_in_force(schedule: Sequence[UnfreezeStep], completed_steps: int) -> LayersSpec:
    """The layers that train in the optimizer steps after completed_steps: the last entry due by then, else 0."""
    due = [entry.layers for entry in schedule if entry.step <= completed_steps]
    return due[-1] if due else 0


def top_layer_indices(layers: LayersSpec, num_layers: int) -> list[int]:
    """Indices (bottom = 0) of the top `layers` decoder layers."""
    count = num_layers if layers == "all" else layers
    return list(range(num_layers - count, num_layers))


class ProgressiveUnfreezing(TrainerCallback):
    """Sets requires_grad as method.unfreeze says at the start of training (also after --resume) and at each
    scheduled step; logs each change to the console and to metrics.jsonl, and adds trainable_parameters to
    every logged training record.

    Must come before MetricsCallback in the callback list: its on_log adds to the record that one writes.
    """

    def __init__(self, model, schedule: Sequence[UnfreezeStep], report: Callable[[str], None],
                 write_record: Callable[[dict], None]):
        """Raises DsftError when an entry names more layers than the model has, or when nothing would train."""
        self.groups = parameter_groups(model)
        self.schedule = list(schedule)
        self.report = report
        self.write_record = write_record
        self._validate()
        self._in_force: LayersSpec | None = None
        self._trainable_count = 0
        self._trained_in_last_step = 0

    def _validate(self) -> None:
        num_layers = len(self.groups.layers)
        for i, entry in enumerate(self.schedule):
            if entry.layers != "all" and entry.layers > num_layers:
                raise DsftError(f"method.unfreeze.{i}.layers: {entry.layers} but the model has {num_layers} layers")
        if not any(self.groups.layers):
            raise DsftError("method.unfreeze: no trainable weight lies in a decoder layer (classify.head_only?)")
        start = layers_in_force(self.schedule, 0)
        if not self.groups.trainable(top_layer_indices(start, num_layers), start == "all"):
            raise DsftError(
                "method.unfreeze: nothing would train before the first scheduled step, since the head does not "
                "train with LoRA; add lm_head to method.lora.modules_to_save or start with {step: 0, layers: 1}"
            )

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run starts in the state of its step; its log records up to that step were kept.
        self._apply(state.global_step, write_record=state.global_step == 0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._trained_in_last_step = self._trainable_count

    def on_step_end(self, args, state, control, **kwargs):
        # Applied when step s has completed rather than when step s+1 begins (no training happens between):
        # the change and its log record then precede the checkpoint of step s, so a resume from it has both.
        if layers_in_force(self.schedule, state.global_step) != self._in_force:
            self._apply(state.global_step, write_record=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["trainable_parameters"] = self._trained_in_last_step

    def _apply(self, completed_steps: int, write_record: bool) -> None:
        layers = layers_in_force(self.schedule, completed_steps)
        indices = top_layer_indices(layers, len(self.groups.layers))
        for param in self.groups.everything():
            param.requires_grad_(False)
        trainable = self.groups.trainable(indices, layers == "all")
        for param in trainable:
            param.requires_grad_(True)
        self._in_force, self._trainable_count = layers, sum(p.numel() for p in trainable)
        self.report(f"step {completed_steps}: training {self._describe(indices, layers == 'all')} "
                    f"({self._trainable_count:,} params)")
        if write_record:
            self.write_record({"step": completed_steps, "trainable_layers": indices,
                               "trainable_parameters": self._trainable_count})

    def _describe(self, indices: list[int], with_embeddings: bool) -> str:
        parts = (["head"] if self.groups.has_head else []) + (["norm"] if self.groups.has_final_norm else [])
        if indices:
            parts.append(f"layers {indices[0]}-{indices[-1]}" if len(indices) > 1 else f"layer {indices[0]}")
        if with_embeddings and self.groups.embeddings:
            parts.append("embeddings")
        return ", ".join(parts)
