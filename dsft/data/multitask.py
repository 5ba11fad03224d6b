"""Records for several task heads on one text: read, validate, map labels to ids, tokenize, split, collate.

A record holds the text (multitask.text_field, a string; or multitask.tokens_field, a list of words,
when any head is of kind token) and, for each head, its label_field: a label (kind sequence) or one
BIO tag per word (kind token). A record may leave out some heads' fields (or set them to null): those
heads get ignore labels for it and learn nothing from it. A record with no head's label is bad. Bad
records raise DsftError naming file:line and the field, or with data.on_error skip are counted.

With words, every head reads the same ids: the words joined by the separator, encoded word by word
(bio.encode_words), so a token head's labels sit on each word's first token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dsft.data.bio import IGNORE_INDEX, SEPARATORS, align_labels, encode_words, tag_names, validate_bio, validate_words
from dsft.data.dataset import DataStats, load_splits, load_validated
from dsft.data.labels import label_names, text_of
from dsft.data.read import RawRecord, json_type
from dsft.errors import DsftError

if TYPE_CHECKING:
    from dsft.config import DataConfig, HeadConfig, MultitaskConfig


def label_key(head_name: str) -> str:
    """The row and model-input key of a head's labels, e.g. labels_intent."""
    return f"labels_{head_name}"


def reads_words(settings: MultitaskConfig) -> bool:
    """True when records hold words (some head tags words), False when they hold a text."""
    return any(head.kind == "token" for head in settings.heads)


@dataclass(frozen=True)
class MultitaskRecord:
    words: list[str] | None
    """The words (when a head is of kind token), else None."""
    text: str | None
    """The text (when no head is of kind token), else None."""
    labels: dict[str, str | list[str]]
    """Head name -> its label (kind sequence, as a string) or tags (kind token); unlabelled heads are absent."""
    source: str
    """"path:LINE" of the record, for error messages."""


def _sequence_label(value, source: str, head: HeadConfig) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise DsftError(f"{source}: field {head.label_field!r} (head {head.name}) is {value!r}, not a non-empty "
                        "string or an integer; leave the field out (or null) when the record has no label for it")
    return str(value)


def _token_tags(value, words: list[str], source: str, head: HeadConfig) -> list[str]:
    if not isinstance(value, list):
        raise DsftError(f"{source}: field {head.label_field!r} (head {head.name}) is a {json_type(value)}; "
                        "give a list of BIO tags, one per word (or leave the field out)")
    validate_bio(words, value, source, head.label_field)
    return list(value)


def to_multitask(record: RawRecord, settings: MultitaskConfig) -> MultitaskRecord:
    """Validate one record; raises DsftError naming file:line and the field at fault, or the record
    when it holds no head's label."""
    words, text = None, None
    if reads_words(settings):
        words = validate_words(record.data.get(settings.tokens_field), record.source, settings.tokens_field)
    else:
        text = text_of(record, settings.text_field)
    labels: dict[str, str | list[str]] = {}
    for head in settings.heads:
        value = record.data.get(head.label_field)
        if value is None:
            continue  # unlabelled for this head
        if head.kind == "sequence":
            labels[head.name] = _sequence_label(value, record.source, head)
        else:
            labels[head.name] = _token_tags(value, words, record.source, head)
    if not labels:
        fields = ", ".join(repr(head.label_field) for head in settings.heads)
        raise DsftError(f"{record.source}: no label for any head (fields {fields}); a record needs at least one")
    return MultitaskRecord(words, text, labels, record.source)


def load_multitask(files: Sequence[str], settings: MultitaskConfig, on_error: str, stats: DataStats,
                   max_samples: int | None = None) -> list[MultitaskRecord]:
    """Read the records of files in order (at most max_samples); on_error "error" raises the first bad
    record's DsftError, "skip" counts it in stats. Raises ValueError for another on_error."""
    return load_validated(files, lambda record: to_multitask(record, settings), on_error, stats, max_samples)


def record_text(record: MultitaskRecord, word_separator: str) -> str:
    """The text the model reads (the words joined by the separator), e.g. to train a preset's tokenizer."""
    return record.text if record.words is None else SEPARATORS[word_separator].join(record.words)


def head_labels(heads: Sequence[HeadConfig], records: Sequence[MultitaskRecord]) -> dict[str, list[str]]:
    """Each head's label names (sequence: labels.label_names; token: bio.tag_names), positions = class ids.
    Raises DsftError for a head that no record labels."""
    names = {}
    for i, head in enumerate(heads):
        values = [record.labels[head.name] for record in records if head.name in record.labels]
        if not values:
            raise DsftError(f"multitask.heads.{i} ({head.name}): no record has field {head.label_field!r}; "
                            "each head needs labelled records")
        names[head.name] = label_names(values) if head.kind == "sequence" else tag_names(values)
    return names


def encode_input(words: Sequence[str] | None, text: str | None, tokenizer, word_separator: str):
    """(input ids, word index of each token or None) as training and prediction read a record: words
    encoded word by word (word_ids None for the framing), or the text with the tokenizer's framing
    (word_ids None)."""
    if words is not None:
        return encode_words(words, tokenizer, word_separator)
    return tokenizer(text, add_special_tokens=True)["input_ids"], None


def encode_multitask(records: Sequence[MultitaskRecord], heads: Sequence[HeadConfig], labels: dict[str, list[str]],
                     tokenizer, settings: MultitaskConfig, data: DataConfig, stats: DataStats) -> list[dict]:
    """Rows {"input_ids", label_key(head): class id (sequence) or one id per token (token)}, fitted to
    data.max_length_tokens (truncated or dropped, counted). Unlabelled heads get IGNORE_INDEX."""
    label2id = {name: {label: i for i, label in enumerate(names)} for name, names in labels.items()}
    rows = []
    for record in records:
        input_ids, word_ids = encode_input(record.words, record.text, tokenizer, settings.word_separator)
        if len(input_ids) > data.max_length_tokens:
            if data.truncation == "drop":
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
            input_ids = input_ids[: data.max_length_tokens]
            word_ids = None if word_ids is None else word_ids[: data.max_length_tokens]
        row = {"input_ids": input_ids}
        for head in heads:
            row[label_key(head.name)] = _head_row_labels(head, record, label2id[head.name], word_ids, len(input_ids))
        rows.append(row)
    return rows


def _head_row_labels(head: HeadConfig, record: MultitaskRecord, label2id: dict[str, int], word_ids, length: int):
    """One head's labels for one row: a class id or IGNORE_INDEX (sequence), one id per token (token)."""
    value = record.labels.get(head.name)
    if head.kind == "sequence":
        return IGNORE_INDEX if value is None else label2id[value]
    if value is None:
        return [IGNORE_INDEX] * length
    return align_labels(word_ids, [label2id[tag] for tag in value])


def labelled_counts(rows: Sequence[dict], heads: Sequence[HeadConfig]) -> dict[str, int]:
    """Rows that carry at least one label for each head (after truncation)."""
    counts = {}
    for head in heads:
        key = label_key(head.name)
        if head.kind == "sequence":
            counts[head.name] = sum(row[key] != IGNORE_INDEX for row in rows)
        else:
            counts[head.name] = sum(any(label != IGNORE_INDEX for label in row[key]) for row in rows)
    return counts


def build_multitask_datasets(data: DataConfig, settings: MultitaskConfig, tokenizer, seed: int):
    """(train rows, validation rows, {head: label names}, stats). Validation from data.validation_files
    or a seeded data.validation_ratio share; the label names cover both splits. Raises DsftError for
    bad data (see to_multitask), a head no record labels, or when no training row is left."""
    stats = DataStats()
    train, validation = load_splits(data, lambda record: to_multitask(record, settings), stats, seed)
    labels = head_labels(settings.heads, [*train, *validation])
    fields = (settings.heads, labels, tokenizer, settings, data, stats)
    train_rows, validation_rows = encode_multitask(train, *fields), encode_multitask(validation, *fields)
    stats.train_examples, stats.validation_examples = len(train_rows), len(validation_rows)
    stats.train_tokens = sum(len(row["input_ids"]) for row in train_rows)
    if not train_rows:
        raise DsftError(f"no training examples left from data.train_files (records read: {stats.records_read}, "
                        f"skipped as bad: {stats.skipped_bad}, dropped as too long: {stats.dropped_too_long})")
    return train_rows, validation_rows, labels, stats


class MultitaskCollator:
    """Pads rows on the right into tensors: input_ids (pad id), attention_mask, each head's labels
    (sequence: [B]; token: [B, L] padded with IGNORE_INDEX), and sample_id when rows carry it."""

    def __init__(self, pad_token_id: int, heads: Sequence[HeadConfig]):
        self.pad_token_id = pad_token_id
        self.heads = list(heads)

    def __call__(self, rows: Sequence[dict]) -> dict:
        import torch

        length = max(len(row["input_ids"]) for row in rows)
        batch = {
            "input_ids": torch.tensor([_padded(row["input_ids"], length, self.pad_token_id) for row in rows]),
            "attention_mask": torch.tensor([[1] * len(row["input_ids"]) + [0] * (length - len(row["input_ids"]))
                                            for row in rows]),
        }
        for head in self.heads:
            key = label_key(head.name)
            values = [row[key] for row in rows]
            if head.kind == "token":
                values = [_padded(labels, length, IGNORE_INDEX) for labels in values]
            batch[key] = torch.tensor(values)
        if "sample_id" in rows[0]:
            batch["sample_id"] = torch.tensor([row["sample_id"] for row in rows])
        return batch


def _padded(values: Sequence[int], length: int, pad: int) -> list[int]:
    return list(values) + [pad] * (length - len(values))
