"""Preference files to token ids: read, validate (preference.py), split, render, encode, fit to the budget.

A pair renders exactly as SFT and generation render: the prompt through `render_prompt` (the text
`dsft generate` gives the model), each answer as the final assistant turn of `render_conversation`,
segment by segment, so the prompt ids of a pair are the ids generation starts from. Rows are
{"prompt_ids", "chosen_ids", "rejected_ids"} with the answers' ids only (TRL's DPO layout); a reward
model reads prompt + answer (`full_sequences`).

Nothing is dropped silently: skipped records, truncated and dropped pairs are counted in DataStats.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dsft.data.chat import render_conversation, shared_thinking
from dsft.data.columns import FieldMap
from dsft.data.dataset import DataStats, load_splits, load_validated
from dsft.data.encode import IGNORE_INDEX, encode_segments
from dsft.data.formats import Message
from dsft.data.preference import PreferencePair, to_pair
from dsft.errors import DsftError

if TYPE_CHECKING:
    from dsft.config import DataConfig


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one pair: the rendered prompt, then each answer's own ids (with its end-of-turn text)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def as_row(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids, "rejected_ids": self.rejected_ids}


def load_pairs(files: Sequence[str], on_error: str, stats: DataStats, system_prompt: str | None = None,
               max_samples: int | None = None, fields: FieldMap | None = None) -> list[PreferencePair]:
    """Read and validate the preference records of files, in order, into at most max_samples pairs.

    With on_error "skip" a bad record is counted in stats and skipped; with "error" it raises DsftError
    naming file:line and field. Always raises DsftError for a missing or unreadable file; ValueError for
    an on_error other than ON_ERROR. fields renames each record first (data.columns, data.tags).
    """
    return load_validated(files, lambda record: to_pair(record, system_prompt), on_error, stats, max_samples, fields)


def pair_texts(pairs: Sequence[PreferencePair]) -> Iterator[str]:
    """Every string of the pairs (prompts, answers, reasoning), for training a preset's tokenizer."""
    for pair in pairs:
        for message in (*pair.prompt, pair.chosen, pair.rejected):
            yield message.content
            if message.reasoning:
                yield message.reasoning


def encode_answer(prompt: Sequence[Message], answer: Message, template: str, tokenizer, thinking: bool | None = None,
                  reasoning: str = "keep") -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of prompt + answer rendered as the final assistant turn, as SFT renders it (in
    thinking mode thinking, with reasoning kept or dropped: dsft.data.chat.render_conversation).

    The prompt ids equal those of `render_prompt(prompt)`: the training render is built from the same pieces.
    Raises DsftError when the template cannot render the conversation.
    """
    segments = render_conversation([*prompt, answer], template, tokenizer, "final_assistant", thinking, reasoning)
    input_ids, labels = encode_segments(segments, tokenizer)
    # Only the final answer carries a label, and it ends the sequence: everything before it is the prompt.
    answer_start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return input_ids[:answer_start], input_ids[answer_start:]


def encode_pair(pair: PreferencePair, template: str, tokenizer, thinking: bool | None = None,
                reasoning: str = "keep") -> EncodedPair:
    """Token ids of a pair, both answers in one thinking mode (they share the prompt); raises DsftError naming the
    record when the template cannot render it."""
    thinking = shared_thinking(template, thinking, (pair.chosen, pair.rejected))
    try:
        prompt_ids, chosen_ids = encode_answer(pair.prompt, pair.chosen, template, tokenizer, thinking, reasoning)
        rejected_prompt_ids, rejected_ids = encode_answer(pair.prompt, pair.rejected, template, tokenizer, thinking,
                                                          reasoning)
    except DsftError as exc:
        raise DsftError(f"{pair.source}: {exc}") from None
    if rejected_prompt_ids != prompt_ids:  # what TRL assumes: one prompt, two answers
        raise DsftError(f"{pair.source}: the chosen and rejected answers render different prompts with {template}")
    return EncodedPair(prompt_ids, chosen_ids, rejected_ids)


def fit_pair(pair: EncodedPair, max_length_tokens: int, truncation: str, stats: DataStats) -> EncodedPair | None:
    """Fit prompt + answer of both sides into max_length_tokens; None (counted in stats) when the pair is dropped.

    truncation "right" keeps the first max_length_tokens of each sequence (the prompt is kept whole, the
    answers are cut); "drop" leaves out a pair with a longer side. A pair is also left out when no answer
    token fits or both answers are the same after the cut: it holds no preference to learn.
    """
    budget_tokens = max_length_tokens - len(pair.prompt_ids)
    too_long = max(len(pair.chosen_ids), len(pair.rejected_ids)) > budget_tokens
    if too_long and truncation == "drop":
        stats.dropped_too_long += 1
        return None
    if budget_tokens <= 0:
        stats.dropped_no_target += 1
        return None
    chosen_ids, rejected_ids = pair.chosen_ids[:budget_tokens], pair.rejected_ids[:budget_tokens]
    if chosen_ids == rejected_ids:
        stats.dropped_no_target += 1
        return None
    if too_long:
        stats.truncated += 1
    return EncodedPair(pair.prompt_ids, chosen_ids, rejected_ids)


def build_preference_datasets(data: DataConfig, template: str, tokenizer, seed: int) -> tuple[list[dict], list[dict], DataStats]:
    """Training and validation rows {"prompt_ids", "chosen_ids", "rejected_ids"} and their stats.

    Validation comes from data.validation_files, or from a data.validation_ratio share of the training
    pairs chosen with seed; otherwise it is empty. Raises DsftError for bad data (see load_pairs), a
    template that cannot render a pair, or when no training pair is left.
    """
    stats = DataStats()
    train, validation = load_splits(data, lambda record: to_pair(record, data.system_prompt), stats, seed)
    train_rows = _encode_pairs(train, data, template, tokenizer, stats)
    validation_rows = _encode_pairs(validation, data, template, tokenizer, stats)
    stats.train_examples, stats.validation_examples = len(train_rows), len(validation_rows)
    stats.trainable_tokens = sum(len(row["chosen_ids"]) + len(row["rejected_ids"]) for row in train_rows)
    stats.train_tokens = stats.trainable_tokens + sum(2 * len(row["prompt_ids"]) for row in train_rows)
    if not train_rows:
        summary = "\n".join(f"  {line}" for line in stats.lines())
        raise DsftError(f"no preference pairs left from data.train_files:\n{summary}")
    return train_rows, validation_rows, stats


def _encode_pairs(pairs: Sequence[PreferencePair], data: DataConfig, template: str, tokenizer, stats: DataStats) -> list[dict]:
    fitted = (fit_pair(encode_pair(pair, template, tokenizer, data.thinking_mode, data.reasoning),
                       data.max_length_tokens, data.truncation, stats) for pair in pairs)
    return [pair.as_row() for pair in fitted if pair is not None]


def full_sequences(row: dict) -> dict:
    """A DPO row as a reward model reads it: {"chosen_ids", "rejected_ids"}, each prompt + answer."""
    return {"chosen_ids": row["prompt_ids"] + row["chosen_ids"], "rejected_ids": row["prompt_ids"] + row["rejected_ids"]}
