"""Text generation with a run's model: the same prompt rendering as training, batched or streamed.

`dsft generate`, `dsft chat`, the exact-match evaluation and (later) the server all build their
prompts through `prompt_ids`, which calls the very functions that rendered the training data.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dsft.data.chat import render_prompt
from dsft.data.encode import encode_segments
from dsft.data.formats import Message
from dsft.data.tokenizer import THINK_CLOSE
from dsft.errors import DsftError


@dataclass(frozen=True)
class DecodeSettings:
    """Decoding flags; greedy by default so results repeat."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def generate_kwargs(self) -> dict:
        kwargs: dict = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


def prompt_ids(messages: Sequence[Message], template: str, tokenizer, thinking: bool | None = None,
               tools: Sequence = ()) -> list[int]:
    """Token ids of the prompt for the next assistant turn (with the declared tools), exactly as training rendered it."""
    ids, _ = encode_segments(render_prompt(messages, template, tokenizer, thinking, tools), tokenizer)
    return ids


def split_reasoning(reply: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a generated reply; reasoning is what precedes </think>, if any."""
    if THINK_CLOSE not in reply:
        return None, reply.strip()
    reasoning, _, answer = reply.partition(THINK_CLOSE)
    return reasoning.replace("<think>", "").strip(), answer.strip()


def pad_left(prompts: Sequence[list[int]], pad_id: int):
    import torch

    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def generate_batch(model, tokenizer, prompts: Sequence[list[int]], settings: DecodeSettings, batch_size: int = 16) -> list[str]:
    """Replies (new tokens only, special tokens removed) for many prompts, left-padded in batches."""
    import torch

    replies: list[str] = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = pad_left(prompts[start : start + batch_size], tokenizer.pad_token_id)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **settings.generate_kwargs(),
            )
        new_tokens = out[:, input_ids.shape[1] :]
        replies.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return replies


def stream_reply(model, tokenizer, ids: list[int], settings: DecodeSettings) -> Iterator[str]:
    """Yield the reply's text piece by piece as tokens are generated."""
    import torch
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        streamer=streamer,
        **settings.generate_kwargs(),
    )
    failures: list[Exception] = []
    worker = threading.Thread(target=_generate_no_grad, args=(model, kwargs, failures), daemon=True)
    worker.start()
    yield from streamer
    worker.join()
    if failures:
        raise DsftError(f"generation failed: {failures[0]}")


def _generate_no_grad(model, kwargs: dict, failures: list[Exception]) -> None:
    """generate in the worker thread; a failure is kept for the caller and ends the stream (else it waits forever)."""
    import torch

    try:
        with torch.no_grad():
            model.generate(**kwargs)
    except Exception as exc:  # reported by stream_reply in the caller's thread
        failures.append(exc)
        kwargs["streamer"].end()
