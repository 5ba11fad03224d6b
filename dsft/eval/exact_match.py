"""Exact match of greedy answers on held-out prompts: the quick check run before and after training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dsft.data.dataset import split_prompt_reference
from dsft.data.formats import Example
from dsft.eval.text_metrics import exact_match
from dsft.models.generate import (
    DecodeSettings,
    generate_batch,
    prompt_ids,
    split_reasoning,
)


@dataclass
class ExactMatchResult:
    accuracy: float
    count: int
    samples: list[dict] = field(default_factory=list)
    """A few (prompt, reference, prediction) triples for the log."""


def score_exact_match(
    model, tokenizer, examples: Sequence[Example], template: str, settings: DecodeSettings, batch_size: int,
    thinking: bool | None = None,
) -> ExactMatchResult:
    """Greedy-decode every example's prompt (in thinking mode thinking, dsft.data.chat's) and compare the answer
    (reasoning removed) to its reference."""
    pairs = [split_prompt_reference(example) for example in examples]
    prompts = [prompt_ids(messages, template, tokenizer, thinking) for messages, _ in pairs]
    was_training = model.training
    model.eval()
    replies = generate_batch(model, tokenizer, prompts, settings, batch_size)
    model.train(was_training)
    hits, samples = 0, []
    for (messages, reference), reply in zip(pairs, replies):
        answer = split_reasoning(reply)[1]
        hits += exact_match(answer, reference)  # the SQuAD-style match of dsft eval
        if len(samples) < 5:
            samples.append({"prompt": messages[-1].content, "reference": reference, "prediction": answer})
    return ExactMatchResult(accuracy=hits / max(len(pairs), 1), count=len(pairs), samples=samples)
