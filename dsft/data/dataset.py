"""From data files to training sequences: read, validate, split, render, encode, truncate.

Nothing is dropped silently: every skipped record and every dropped or truncated sequence is
counted in DataStats, whose lines() go to the training log.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from dsft.data.chat import Segment, check_thinking, render_conversation, render_text, resolve_template
from dsft.data.columns import FieldMap
from dsft.data.deepseek_layouts import LAYOUTS, tool_system_prompt
from dsft.data.encode import IGNORE_INDEX, encode_segments, truncate
from dsft.data.formats import Example, Message, detect_format, to_example
from dsft.data.read import RawRecord, read_records
from dsft.errors import DsftError

if TYPE_CHECKING:
    from dsft.config import DataConfig

MAX_SKIP_REASONS = 20
"""Skipped records whose error message is kept for the log; the rest are only counted."""

ON_ERROR = ("error", "skip")


@dataclass
class DataStats:
    """Counts of what happened to the data, for the log and the run summary."""

    records_read: int = 0
    skipped_bad: int = 0
    """Bad records skipped with on_error: skip."""
    skip_reasons: list[str] = field(default_factory=list)
    """Error messages of the first MAX_SKIP_REASONS skipped records."""
    truncated: int = 0
    """Sequences cut to max_length_tokens (truncation: right)."""
    dropped_too_long: int = 0
    """Sequences over max_length_tokens left out (truncation: drop)."""
    dropped_no_target: int = 0
    """Sequences left out because no trainable token remained after truncation."""
    train_examples: int = 0
    validation_examples: int = 0
    train_tokens: int = 0
    """Tokens in all training sequences."""
    trainable_tokens: int = 0
    """Training tokens that carry loss."""

    def add_skip(self, error: DsftError) -> None:
        """Count one skipped bad record, keeping its message while fewer than MAX_SKIP_REASONS are kept."""
        self.skipped_bad += 1
        if len(self.skip_reasons) < MAX_SKIP_REASONS:
            self.skip_reasons.append(str(error))

    def lines(self) -> list[str]:
        """Human-readable summary lines for the log."""
        lines = [f"records read: {self.records_read:,}, skipped as bad: {self.skipped_bad:,}"]
        lines += [f"  skipped {reason}" for reason in self.skip_reasons]
        if self.skipped_bad > len(self.skip_reasons):
            lines.append(f"  ... and {self.skipped_bad - len(self.skip_reasons):,} more skipped")
        lines.append(f"examples: {self.train_examples:,} train, {self.validation_examples:,} validation")
        lines.append(
            f"over max_length_tokens: {self.truncated:,} truncated, {self.dropped_too_long:,} dropped; "
            f"dropped with no trainable token left: {self.dropped_no_target:,}"
        )
        share = self.trainable_tokens / self.train_tokens if self.train_tokens else 0.0
        lines.append(f"train tokens: {self.train_tokens:,}, trainable: {self.trainable_tokens:,} ({share:.1%})")
        return lines


def load_examples(
    files: Sequence[str],
    fmt: str,
    on_error: str,
    stats: DataStats,
    system_prompt: str | None = None,
    max_samples: int | None = None,
    *,
    require_answer: bool = True,
    fields: FieldMap | None = None,
) -> list[Example]:
    """Read and validate the records of files, in order, into at most max_samples examples.

    fmt is one of FORMATS or "auto" (detected per file from its first record). require_answer
    False accepts records without their answer (prompts to evaluate; see to_example). With on_error
    "skip" a bad record is counted in stats and skipped; with "error" it raises DsftError naming
    file:line and field. Always raises DsftError for a missing or unreadable file, and for a file
    whose format cannot be detected. Raises ValueError for an on_error other than ON_ERROR. fields renames
    each record's fields first (data.columns, data.tags); its errors then name the file's own fields.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"unknown on_error {on_error!r}; allowed: {', '.join(ON_ERROR)}")
    examples: list[Example] = []
    for path in files:
        if max_samples is not None and len(examples) >= max_samples:
            break
        limit = None if max_samples is None else max_samples - len(examples)
        examples += _load_file(path, fmt, on_error == "skip", stats, system_prompt, limit, require_answer,
                               fields or FieldMap())
    return examples


def _load_file(
    path: str,
    fmt: str,
    skip_bad: bool,
    stats: DataStats,
    system_prompt: str | None,
    limit: int | None,
    require_answer: bool,
    fields: FieldMap,
) -> list[Example]:
    def skip_unreadable(error: DsftError) -> None:
        stats.records_read += 1
        stats.add_skip(error)

    examples: list[Example] = []
    file_format = None if fmt == "auto" else fmt
    for record in read_records(path, on_bad_record=skip_unreadable if skip_bad else None):
        stats.records_read += 1
        try:
            record = fields.apply(record)
        except DsftError as error:
            skip_or_raise(error, skip_bad, stats)
            continue
        if file_format is None:
            file_format = detect_format(record)  # outside the try: a file of unknown layout is never skipped
        try:
            examples.append(_explained(fields, to_example, record, file_format, system_prompt,
                                       require_answer=require_answer))
        except DsftError as error:
            skip_or_raise(error, skip_bad, stats)
        if limit is not None and len(examples) >= limit:
            break
    return examples


T = TypeVar("T")


def skip_or_raise(error: DsftError, skip_bad: bool, stats: DataStats) -> None:
    """Count a bad record's error in stats (skip_bad, on_error skip), else raise it."""
    if not skip_bad:
        raise error
    stats.add_skip(error)


def _explained(fields: FieldMap, read: Callable[..., T], *args, **kwargs) -> T:
    """read(*args, **kwargs), its DsftError naming the file's own fields."""
    try:
        return read(*args, **kwargs)
    except DsftError as error:
        raise fields.explain(error) from None


def load_validated(files: Sequence[str], validate: Callable[[RawRecord], T], on_error: str, stats: DataStats,
                   max_samples: int | None = None, fields: FieldMap | None = None) -> list[T]:
    """validate(record) for each record of files in order, at most max_samples results; the record readers of
    the head tasks and preference data. on_error "error" raises the first bad record's DsftError (naming
    file:line), "skip" counts it in stats. Raises ValueError for an on_error other than ON_ERROR. fields
    renames each record first, as in load_examples."""
    if on_error not in ON_ERROR:
        raise ValueError(f"unknown on_error {on_error!r}; allowed: {', '.join(ON_ERROR)}")
    skip_bad, fields = on_error == "skip", fields or FieldMap()

    def skip_unreadable(error: DsftError) -> None:
        stats.records_read += 1
        stats.add_skip(error)

    results: list[T] = []
    for path in files:
        for record in read_records(path, on_bad_record=skip_unreadable if skip_bad else None):
            if max_samples is not None and len(results) >= max_samples:
                return results
            stats.records_read += 1
            try:
                results.append(_explained(fields, validate, fields.apply(record)))
            except DsftError as error:
                skip_or_raise(error, skip_bad, stats)
    return results


def load_splits(data: DataConfig, validate: Callable[[RawRecord], T], stats: DataStats, seed: int) -> tuple[list[T], list[T]]:
    """(train, validation) validated records: data.train_files (at most data.max_samples), validation from
    data.validation_files or a seeded data.validation_ratio share of train; on_error as load_validated."""
    fields = FieldMap.of(data)
    train = load_validated(data.train_files, validate, data.on_error, stats, data.max_samples, fields)
    if data.validation_files:
        return train, load_validated(data.validation_files, validate, data.on_error, stats, fields=fields)
    if data.validation_ratio > 0:
        return _split_validation(train, data.validation_ratio, seed)
    return train, []


def build_sft_datasets(data: DataConfig, tokenizer, seed: int) -> tuple[list[dict], list[dict], DataStats]:
    """Training and validation sequences, each {"input_ids": [...], "labels": [...]}, and their stats.

    Validation comes from data.validation_files, or from a data.validation_ratio share of the
    training examples chosen with seed; otherwise it is empty. Raises DsftError for bad data (see
    load_examples), a template that cannot render the data, or when no training sequence is left.
    """
    stats = DataStats()
    template = resolve_template(data.chat_template, tokenizer)
    check_thinking(template, data.thinking_mode)  # before any record is read
    train_examples = load_examples(
        data.train_files, data.format, data.on_error, stats, data.system_prompt, data.max_samples,
        fields=FieldMap.of(data),
    )
    validation_examples: list[Example] = []
    if data.validation_files:
        validation_examples = load_examples(
            data.validation_files, data.format, data.on_error, stats, data.system_prompt, fields=FieldMap.of(data)
        )
    elif data.validation_ratio > 0:
        train_examples, validation_examples = _split_validation(train_examples, data.validation_ratio, seed)

    train = _encode_examples(train_examples, template, tokenizer, data, stats)
    validation = _encode_examples(validation_examples, template, tokenizer, data, stats)
    stats.train_examples, stats.validation_examples = len(train), len(validation)
    stats.train_tokens = sum(len(row["input_ids"]) for row in train)
    stats.trainable_tokens = sum(label != IGNORE_INDEX for row in train for label in row["labels"])
    if not train:
        summary = "\n".join(f"  {line}" for line in stats.lines())
        raise DsftError(f"no training examples left from data.train_files:\n{summary}")
    return train, validation, stats


def _split_validation(examples: list[Example], ratio: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out round(ratio * count) examples (at least one, leaving one to train); both keep file order."""
    count = len(examples)
    if count < 2:
        return examples, []
    validation_count = min(max(1, round(count * ratio)), count - 1)
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held_out = set(order[:validation_count])
    train = [example for i, example in enumerate(examples) if i not in held_out]
    validation = [example for i, example in enumerate(examples) if i in held_out]
    return train, validation


def _encode_examples(
    examples: list[Example], template: str, tokenizer, data: DataConfig, stats: DataStats
) -> list[dict]:
    rows = [_encode_example(example, template, tokenizer, data, stats) for example in examples]
    return [row for row in rows if row is not None]


def _encode_example(example: Example, template: str, tokenizer, data: DataConfig, stats: DataStats) -> dict | None:
    """Ids and labels of one example, fitted to data.max_length_tokens; None (counted) when dropped."""
    input_ids, labels = encode_segments(_render(example, template, tokenizer, data), tokenizer)
    too_long = len(input_ids) > data.max_length_tokens
    fitted = truncate(input_ids, labels, data.max_length_tokens, data.truncation)
    if fitted is None:
        if too_long and data.truncation == "drop":
            stats.dropped_too_long += 1
        else:
            stats.dropped_no_target += 1
        return None
    if too_long:
        stats.truncated += 1
    return {"input_ids": fitted[0], "labels": fitted[1]}


def _render(example: Example, template: str, tokenizer, data: DataConfig) -> list[Segment]:
    thinking = data.thinking_mode if example.thinking is None else example.thinking
    try:
        if example.text is not None:
            return render_text(example.text, tokenizer)
        return render_conversation(example.messages, template, tokenizer, data.loss_on, thinking, data.reasoning,
                                   example.tools)
    except DsftError as exc:
        raise DsftError(f"{example.source}: {exc}") from None


def example_texts(example: Example, template: str):
    """Every string of an example a preset's tokenizer should learn: texts, messages, reasoning, tool calls and
    the description of its tools (as the built-in template template writes it; deepseek_v3's for another)."""
    if example.text is not None:
        yield example.text
    for message in example.messages:
        yield message.content
        if message.reasoning:
            yield message.reasoning
        for call in message.tool_calls:
            yield f"{call.name} {call.arguments}"
    if example.tools:
        yield tool_system_prompt("", example.tools, template if template in LAYOUTS else "deepseek_v3")


def split_prompt_reference(example: Example) -> tuple[tuple[Message, ...], str]:
    """For evaluation: the prompt messages (all but the final assistant turn) and the reference answer.

    The reference is the final answer without its reasoning. Raises DsftError for a text example
    or a conversation that does not end with an assistant turn.
    """
    if example.text is not None:
        raise DsftError(
            f"{example.source}: a text record has no prompt and reference answer; "
            "evaluation needs a chat format (alpaca, messages or sharegpt)"
        )
    if not example.messages or example.messages[-1].role != "assistant":
        raise DsftError(f"{example.source}: the conversation must end with the assistant answer to score against")
    return example.messages[:-1], example.messages[-1].content


def split_prompt_reference_optional(example: Example) -> tuple[tuple[Message, ...], str | None]:
    """Like split_prompt_reference, but a conversation ending with a user turn (or tool results) is all prompt:
    (messages, None).

    Such examples come from load_examples(..., require_answer=False). Raises DsftError for a text
    example or a conversation ending with neither a user nor an assistant turn.
    """
    if example.text is None and example.messages and example.messages[-1].role in ("user", "tool"):
        return example.messages, None
    return split_prompt_reference(example)
