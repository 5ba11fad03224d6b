"""Token ids and labels from rendered segments, and truncation to the sequence budget."""

from __future__ import annotations

from collections.abc import Sequence

from dsft.data.chat import Segment

IGNORE_INDEX = -100
"""Label of a token that carries no loss (the value torch's cross-entropy ignores)."""

TRUNCATION_POLICIES = ("right", "drop")


def encode_segments(segments: Sequence[Segment], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the segments, concatenated, and labels: the id where trainable, else IGNORE_INDEX.

    Each segment is encoded on its own, without special tokens added (the templates write them as
    text): encoding the joined string could merge tokens across a boundary, and then the prompt
    tokens seen in training would differ from those `render_prompt` gives at generation time.
    """
    if not segments:
        return [], []
    encoded = tokenizer([segment.text for segment in segments], add_special_tokens=False)["input_ids"]
    input_ids: list[int] = []
    labels: list[int] = []
    for segment, ids in zip(segments, encoded, strict=True):
        input_ids += ids
        labels += ids if segment.trainable else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def truncate(
    input_ids: list[int], labels: list[int], max_length_tokens: int, policy: str
) -> tuple[list[int], list[int]] | None:
    """Fit a sequence into max_length_tokens.

    policy "right" keeps the first max_length_tokens tokens; "drop" returns None for a longer
    sequence. Also returns None when no label other than IGNORE_INDEX remains, since such a
    sequence has nothing to train on. Raises ValueError for another policy.
    """
    if policy not in TRUNCATION_POLICIES:
        raise ValueError(f"unknown truncation policy {policy!r}; allowed: {', '.join(TRUNCATION_POLICIES)}")
    if len(input_ids) > max_length_tokens:
        if policy == "drop":
            return None
        input_ids, labels = input_ids[:max_length_tokens], labels[:max_length_tokens]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return input_ids, labels
