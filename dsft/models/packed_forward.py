"""Padding-free forwards for padded batches: the transformer body runs a batch's real tokens as one packed row.

Stages whose data stays padded (classifiers, token taggers, multi-task heads, reward models, GRPO and PPO, whose
batches are built by TRL or by dsft's own rollout) still compute no padding token: pack_decoder wraps the body's
forward (the `model.model` of a `*ForCausalLM`/`*ForSequenceClassification`/`*ForTokenClassification`, or a bare
AutoModel backbone) so that
- the real tokens (attention mask 1) of every row go back to back into one row, position ids restarting at each row;
  with no attention mask, transformers turns restarting position ids into attention confined to each sequence
  (a block-diagonal causal mask for eager and sdpa, varlen kernels for flash attention);
- the per-token outputs (last hidden state, and each hidden state when asked for) are scattered back into the
  padded (rows, length, hidden) layout, zeros at padding.
Everything above the body (LM head, score head, pooling at the last real token, value head, the losses) sees the
shapes and values it would see padded. RoPE depends on relative positions only, so a left-padded row (whose padded
positions start at its padding count) gives the same result to rounding.
Generation (a cache, or use_cache=True) and calls that bring their own position ids run unchanged.
"""

from __future__ import annotations

import functools
import types

import torch


def packed_positions(attention_mask_RL: torch.Tensor) -> torch.Tensor:
    """position_ids_1N of the real tokens of every row back to back, restarting at 0 at each row."""
    real_RL = attention_mask_RL.bool()
    return (real_RL.long().cumsum(dim=1) - 1)[real_RL].unsqueeze(0)


def unpack_tokens(values_1N: torch.Tensor, attention_mask_RL: torch.Tensor) -> torch.Tensor:
    """The per-token values of the packed row, (1, N, ...), in the padded layout (R, L, ...), zeros at padding;
    differentiable."""
    real_RL = attention_mask_RL.bool()
    out_shape = (*real_RL.shape, *values_1N.shape[2:])
    return values_1N.new_zeros(out_shape).masked_scatter(broadcast_mask(real_RL, out_shape), values_1N[0])


def broadcast_mask(mask_RL: torch.Tensor, shape: tuple) -> torch.Tensor:
    """mask_RL (rows, length) expanded over the trailing dimensions of shape (rows, length, ...)."""
    return mask_RL.reshape(*mask_RL.shape, *([1] * (len(shape) - 2))).expand(shape)


def body_of(model) -> torch.nn.Module:
    """The transformer body of a (PEFT-wrapped) causal LM, head model, bare backbone or multi-task model."""
    from peft import PeftModel

    from dsft.models.multitask import MultitaskModel

    if isinstance(model, MultitaskModel):
        model = model.backbone
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return model.base_model


def packs(kwargs: dict) -> bool:
    """Whether a body call with these keyword arguments runs packed: a padded 2D attention mask, no position ids
    of its own, no cache."""
    attention_mask = kwargs.get("attention_mask")
    if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2 or kwargs.get("position_ids") is not None:
        return False
    if kwargs.get("use_cache") or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return False
    # A batch without padding gains nothing from packing.
    return not bool(attention_mask.all())


def pack_decoder(body: torch.nn.Module) -> None:
    """Make body (see body_of) run each padded batch packed, as the module docstring says. Idempotent."""
    if getattr(body, "_dsft_packed", False):
        return
    padded_forward = body.forward

    @functools.wraps(type(body).forward)
    def packed_forward(self, *args, **kwargs):
        if args[1:]:  # more than input_ids by position: the call is left as it is
            return padded_forward(*args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        if not packs(kwargs):
            return padded_forward(**kwargs)
        input_ids, inputs_embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        attention_mask = kwargs.pop("attention_mask")
        kwargs.pop("position_ids", None)
        kwargs.pop("use_cache", None)
        real_RL = attention_mask.bool()
        outputs = padded_forward(
            input_ids=None if input_ids is None else input_ids[real_RL].unsqueeze(0),
            inputs_embeds=None if inputs_embeds is None else inputs_embeds[real_RL].unsqueeze(0),
            position_ids=packed_positions(attention_mask), use_cache=False, **kwargs)
        tokens = int(real_RL.sum())
        for name, value in outputs.items():
            if torch.is_tensor(value) and value.shape[:2] == (1, tokens):
                outputs[name] = unpack_tokens(value, attention_mask)
            elif isinstance(value, tuple) and value and all(torch.is_tensor(v) and v.shape[:2] == (1, tokens)
                                                              for v in value):
                outputs[name] = tuple(unpack_tokens(v, attention_mask) for v in value)
        return outputs

    body.forward = types.MethodType(packed_forward, body)
    body._dsft_packed = True


def is_packed(model) -> bool:
    """Whether pack_model has wrapped model's body."""
    return getattr(body_of(model), "_dsft_packed", False)


def pack_model(model) -> None:
    """pack_decoder on the body of model (a PEFT wrapper, causal LM, head model or backbone)."""
    pack_decoder(body_of(model))
