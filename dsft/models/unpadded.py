"""Models that must never see a padding token before a real one: padding goes to the right, generation unpadded.

DeepSeek-V4's compressors pool every compress_rate consecutive tokens of a row into one KV entry, counted from the
row's first position, and the attention mask does not reach inside that pooling. Left padding therefore puts pad
tokens into the first entries and shifts every window: a left-padded prompt's logits differ from the same prompt
alone (by 0.17 on tiny-deepseek-v4). Right padding is harmless (pads come after every real token), but TRL's and
dsft's rollouts, generation and the server pad on the left. So, for such a model:
- pads_on_the_right wraps the body's forward (as packed_forward does, same calls intercepted): a batch with padding
  before real tokens runs as one batch with each row's real tokens moved to its start (right padding: a pad then
  only ever follows the real tokens, and causal attention keeps it out of their windows), and the outputs go back
  under each token's own position, zeros at padding;
- generate_by_length wraps the model's generate: prompts of different lengths are generated in groups of one
  length (no padding at all), and the outputs are put back in the batch's left-padded layout, completions padded
  with pad_token_id after their end, as one generate call returns them.
Both wrap one instance (not the class), so nothing else changes; a batch without padding, or padded on the right,
runs as it is.
"""

from __future__ import annotations

import functools
import types

import torch

from dsft.models.families import family_of, model_type_of
from dsft.models.packed_forward import body_of, broadcast_mask, packs, unpack_tokens


def guard_padding(model):
    """pads_on_the_right and generate_by_length on model when its family cannot see padding; returns model."""
    if family_of(model_type_of(model)).padding_blocker is None:
        return model
    pads_on_the_right(body_of(model))
    generate_by_length(model)
    return model


def pads_on_the_right(body: torch.nn.Module) -> None:
    """Run body's padded calls with every row's real tokens moved to its start (module docstring). Idempotent."""
    if getattr(body, "_dsft_pads_right", False):
        return
    padded_forward = body.forward

    @functools.wraps(type(body).forward)
    def right_padded_forward(self, *args, **kwargs):
        if args[1:]:
            return padded_forward(*args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        if not packs(kwargs) or _right_padded(kwargs["attention_mask"]):
            return padded_forward(**kwargs)
        real_RL = kwargs.pop("attention_mask").bool()
        kwargs.pop("position_ids", None)
        kwargs.pop("use_cache", None)
        moved_RL = torch.arange(real_RL.shape[1], device=real_RL.device) < real_RL.sum(dim=1, keepdim=True)
        for name in ("input_ids", "inputs_embeds"):
            if kwargs.get(name) is not None:
                values = kwargs[name]
                kwargs[name] = values.new_zeros(values.shape).masked_scatter(broadcast_mask(moved_RL, values.shape), values[real_RL])
        outputs = padded_forward(attention_mask=moved_RL.long(), use_cache=False, **kwargs)
        return _moved_back(outputs, moved_RL, real_RL)

    body.forward = types.MethodType(right_padded_forward, body)
    body._dsft_pads_right = True


def _right_padded(attention_mask_RL: torch.Tensor) -> bool:
    """Whether every row's real tokens come first (a mask that never rises from 0 to 1 along a row)."""
    return not bool((attention_mask_RL[:, 1:] > attention_mask_RL[:, :-1]).any())


def _moved_back(outputs, moved_RL: torch.Tensor, real_RL: torch.Tensor):
    """Per-token outputs of the right-padded call put back under each token's own padded position, zeros at padding."""
    shape = tuple(moved_RL.shape)

    def back(value):
        return unpack_tokens(value[moved_RL].unsqueeze(0), real_RL)

    for name, value in list(outputs.items()):
        if torch.is_tensor(value) and tuple(value.shape[:2]) == shape:
            outputs[name] = back(value)
        elif isinstance(value, tuple) and value and all(torch.is_tensor(v) and tuple(v.shape[:2]) == shape
                                                          for v in value):
            outputs[name] = tuple(back(v) for v in value)
    return outputs


def generate_by_length(model) -> None:
    """Wrap model.generate so prompts of one length generate together and never padded (module docstring)."""
    if getattr(model, "_dsft_by_length", False):
        return
    batched_generate = model.generate

    @functools.wraps(batched_generate)
    def by_length(*args, input_ids=None, attention_mask=None, **kwargs):
        if args or input_ids is None or attention_mask is None or bool(attention_mask.all()):
            return batched_generate(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if kwargs.get("streamer") is not None:
            raise ValueError("a streamed generate of prompts of different lengths cannot run unpadded; "
                             "give it prompts of one length")
        pad_id = kwargs.get("pad_token_id", model.generation_config.pad_token_id)
        return _generated_by_length(batched_generate, input_ids, attention_mask.bool(), pad_id, kwargs)

    model.generate = by_length
    model._dsft_by_length = True


def _generated_by_length(batched_generate, input_ids_RL, real_RL, pad_id: int | None, kwargs: dict) -> torch.Tensor:
    if pad_id is None:
        raise ValueError("generate_by_length needs pad_token_id to lay the outputs out as one batch")
    if not bool(real_RL[:, -1].all()):
        raise ValueError("generate_by_length takes left-padded prompts (every row's last token real)")
    if kwargs.get("return_dict_in_generate"):
        raise ValueError("generate_by_length returns token ids only (return_dict_in_generate is not supported)")
    lengths = real_RL.sum(dim=1)
    width = input_ids_RL.shape[1]
    finished: dict[int, torch.Tensor] = {}
    for length in sorted(set(lengths.tolist())):
        rows = (lengths == length).nonzero().flatten()
        prompt = torch.stack([input_ids_RL[r][real_RL[r]] for r in rows.tolist()])
        out = batched_generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        for i, r in enumerate(rows.tolist()):
            finished[r] = torch.cat([input_ids_RL[r, : width - length], out[i]])  # the row's own left padding back
    longest = max(len(row) for row in finished.values())
    layout = input_ids_RL.new_full((len(finished), longest), pad_id)
    for r, row in finished.items():
        layout[r, : len(row)] = row
    return layout
