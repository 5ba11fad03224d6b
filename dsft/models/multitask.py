"""Several task heads on one shared backbone: a torch module composed of the causal LM's base model and a
Linear head per task.

A sequence head reads the hidden state of the last token that is not padding (as transformers'
*ForSequenceClassification pools); a token head reads every position. The loss is the weighted sum
over heads of each head's cross entropy, averaged over the items the batch labels for that head (in training,
over the items the whole optimizer step labels: MultitaskModel.step_loss).

The run directory holds the backbone as plain Hugging Face (full: config.json and model.safetensors
of the base model; LoRA: the PEFT adapter, with a preset's random-init base in base_model/), the heads
in heads.safetensors and their names, kinds, labels and loss weights in multitask.json. Weights are
read from safetensors only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from dsft.data.bio import IGNORE_INDEX
from dsft.data.multitask import label_key
from dsft.errors import DsftError

HEADS_FILE = "heads.safetensors"
MULTITASK_FILE = "multitask.json"


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    name: str
    kind: str
    """sequence (one label per text) or token (one label per token)."""
    labels: list[str]
    """Label names; a label's position is its class id."""
    loss_weight: float = 1.0


@dataclasses.dataclass
class MultitaskOutput(ModelOutput):
    loss: torch.Tensor | None = None
    """sum over heads of loss_weight x the head's mean cross entropy; None without labels."""
    logits: dict[str, torch.Tensor] | None = None
    """Head name -> logits: [B, C] for a sequence head, [B, L, C] for a token head."""
    head_losses: dict[str, torch.Tensor] | None = None
    """Head name -> its mean cross entropy over its labelled items (0 when the batch labels none)."""
    head_items: dict[str, torch.Tensor] | None = None
    """Head name -> how many items (texts or tokens) of the batch carry its labels."""


def last_token_index(input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None, pad_token_id: int | None):
    """Position of each row's last token that is not padding ([B]); padding is where attention_mask is 0, or
    (without a mask) where input_ids is pad_token_id. Works for left and right padding."""
    if attention_mask_BL is not None:
        keep_BL = attention_mask_BL.bool()
    elif pad_token_id is not None:
        keep_BL = input_ids_BL != pad_token_id
    else:
        keep_BL = torch.ones_like(input_ids_BL, dtype=torch.bool)
    positions_L = torch.arange(input_ids_BL.shape[-1], device=input_ids_BL.device)
    return (positions_L * keep_BL).argmax(-1)


def head_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross entropy over the items labels marks, count of those items); the mean is 0 (with the graph
    kept) when labels are all IGNORE_INDEX. logits [..., C], labels [...]."""
    logits_NC = logits.float().reshape(-1, logits.shape[-1])
    labels_N = labels.reshape(-1).to(logits_NC.device)
    items = (labels_N != IGNORE_INDEX).sum()
    summed = F.cross_entropy(logits_NC, labels_N, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / items.clamp(min=1), items


class MultitaskModel(nn.Module):
    """A backbone (a transformers base model, or a PEFT model wrapping one) and a Linear head per task."""

    # The loss is a per-batch mean, so the Trainer divides it by the gradient accumulation steps itself.
    accepts_loss_kwargs = False

    def __init__(self, backbone, heads: Sequence[HeadSpec], pad_token_id: int | None, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.head_specs = list(heads)
        self.pad_token_id = pad_token_id
        config = _backbone_config(backbone)
        weight = next(backbone.parameters())
        # Its own generator: the heads start the same whatever ran before, and torch's global seed is left alone.
        generator = torch.Generator().manual_seed(seed)
        self.heads = nn.ModuleDict()
        for spec in self.head_specs:
            linear = nn.Linear(config.hidden_size, len(spec.labels))
            # As transformers initialises its score heads: small normal weights, so the first loss is about log(C).
            nn.init.normal_(linear.weight, std=getattr(config, "initializer_range", 0.02), generator=generator)
            nn.init.zeros_(linear.bias)
            self.heads[spec.name] = linear.to(device=weight.device, dtype=weight.dtype)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids, attention_mask=None, **labels) -> MultitaskOutput:
        """Logits of every head; with labels (keys labels_<head>, IGNORE_INDEX where unlabelled) also the loss.

        Raises TypeError for a keyword that names no head's labels.
        """
        unknown = set(labels) - {label_key(spec.name) for spec in self.head_specs}
        if unknown:
            raise TypeError(f"unexpected inputs {sorted(unknown)}; labels go in labels_<head> for heads "
                            f"{[spec.name for spec in self.head_specs]}")
        hidden_BLD = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last_B = last_token_index(input_ids, attention_mask, self.pad_token_id)
        pooled_BD = hidden_BLD[torch.arange(hidden_BLD.shape[0], device=hidden_BLD.device), last_B]
        logits = {}
        for spec in self.head_specs:
            features = pooled_BD if spec.kind == "sequence" else hidden_BLD
            logits[spec.name] = self.heads[spec.name](features.to(self.heads[spec.name].weight.dtype))
        if not labels:
            return MultitaskOutput(logits=logits)
        loss, head_losses, head_items = self.loss(logits, labels)
        return MultitaskOutput(loss=loss, logits=logits, head_losses=head_losses, head_items=head_items)

    def loss(self, logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]):
        """(sum_h loss_weight_h x mean CE_h, {head: mean CE}, {head: labelled items}) over the heads labels holds."""
        total, head_losses, head_items = None, {}, {}
        for spec in self.head_specs:
            if label_key(spec.name) not in labels:
                continue
            head_losses[spec.name], head_items[spec.name] = head_loss(logits[spec.name], labels[label_key(spec.name)])
            weighted = spec.loss_weight * head_losses[spec.name]
            total = weighted if total is None else total + weighted
        return total, head_losses, head_items

    def step_loss(self, logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                  items_per_step: dict[str, int], micro_batches_per_step: int) -> torch.Tensor:
        """This micro-batch's share of its optimizer step's loss: sum_h loss_weight_h x (its summed CE_h / the
        items labelled for h in the whole step) x micro_batches_per_step. Averaged over the step's micro-batches
        (as the Trainer and the engines average), it is each head's mean over the step's labelled items, whatever
        the micro-batch sizes: gradient accumulation and several ranks equal one large batch."""
        total = None
        for spec in self.head_specs:
            if label_key(spec.name) not in labels or not items_per_step.get(spec.name):
                continue
            mean, items = head_loss(logits[spec.name], labels[label_key(spec.name)])
            share = spec.loss_weight * mean * items * micro_batches_per_step / items_per_step[spec.name]
            total = share if total is None else total + share
        return total if total is not None else sum(logit.sum() * 0.0 for logit in logits.values())

    def save_pretrained(self, directory: str | Path, safe_serialization: bool = True) -> None:
        """Write the backbone (save_pretrained: full model or PEFT adapter), heads.safetensors and multitask.json.

        safe_serialization must be True: weights are written as safetensors only.
        """
        from safetensors.torch import save_file

        if not safe_serialization:
            raise ValueError("a multitask model is saved as safetensors only")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory, safe_serialization=True)
        heads = {name: tensor.detach().cpu().contiguous() for name, tensor in self.heads.state_dict().items()}
        save_file(heads, str(directory / HEADS_FILE), metadata={"format": "pt"})
        (directory / MULTITASK_FILE).write_text(json.dumps(self.description(), indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")

    def description(self) -> dict:
        """What multitask.json records: the heads and the backbone's architecture."""
        config = _backbone_config(self.backbone)
        return {
            "heads": [dataclasses.asdict(spec) for spec in self.head_specs],
            "backbone": {"architecture": type(_base_model(self.backbone)).__name__, "model_type": config.model_type,
                         "hidden_size": config.hidden_size, "adapter": hasattr(self.backbone, "peft_config")},
            "pad_token_id": self.pad_token_id,
        }


def _base_model(backbone):
    """The transformers model under a PEFT wrapper (or the backbone itself)."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def _backbone_config(backbone):
    return _base_model(backbone).config


def apply_backbone_method(backbone, method):
    """Prepare the backbone for method.type (the heads always train in full): LoRA adapts the backbone only
    (PEFT task FEATURE_EXTRACTION), freeze trains its top layers and final norm, full trains everything.
    Returns the backbone to use (a PEFT model for lora); raises DsftError as method.apply_method does."""
    from dsft.models.method import apply_method

    if method.adapter:
        return apply_method(backbone, method, "FEATURE_EXTRACTION")
    if method.type == "freeze":
        _freeze_backbone(backbone, method.freeze.trainable_layers, method.freeze.train_embeddings)
    return backbone


def _freeze_backbone(backbone, trainable_layers: int, train_embeddings: bool) -> None:
    """method.py's freeze without an LM head to unfreeze: the top layers, the final norm, maybe the embeddings."""
    from dsft.models.method import decoder_layers

    layers = decoder_layers(backbone)
    if trainable_layers > len(layers):
        raise DsftError(f"method.freeze.trainable_layers: {trainable_layers} but the model has {len(layers)} layers")
    backbone.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers:]:
        layer.requires_grad_(True)
    if getattr(backbone, "norm", None) is not None:
        backbone.norm.requires_grad_(True)  # it sits above the top layer, so it trains with it
    if train_embeddings:
        backbone.get_input_embeddings().requires_grad_(True)
