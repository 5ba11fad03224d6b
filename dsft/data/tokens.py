"""Words with BIO tags for token classification: read, validate, map tags to ids, encode, truncate, split.

A record holds a list of words (token_classify.tokens_field) and one BIO tag per word
(token_classify.tags_field). Bad records raise DsftError naming file:line and the field, or with
data.on_error skip are counted in DataStats. Words are encoded one by one (dsft.data.bio), so each
word's first token carries its tag and the rest carry IGNORE_INDEX.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dsft.data import bio
from dsft.data.dataset import DataStats, load_splits, load_validated
from dsft.data.read import RawRecord, json_type
from dsft.errors import DsftError

if TYPE_CHECKING:
    from dsft.config import DataConfig, TokenClassifyConfig

TEXT_FIELD = "text"
"""Field read at prediction time, split into words, when a record has no word list."""


@dataclass(frozen=True)
class TaggedWords:
    words: list[str]
    tags: list[str]
    """One BIO tag per word."""
    source: str
    """"path:LINE" of the record, for error messages."""


def to_tagged(record: RawRecord, tokens_field: str, tags_field: str) -> TaggedWords:
    """Validate one record; raises DsftError naming file:line and the field at fault."""
    if tokens_field not in record.data:
        raise DsftError(f"{record.source}: field {tokens_field!r} is missing")
    words = bio.validate_words(record.data[tokens_field], record.source, tokens_field)
    tags = record.data.get(tags_field)
    if not isinstance(tags, list):
        found = "missing" if tags_field not in record.data else f"a {json_type(tags)}, not a list of tags"
        raise DsftError(f"{record.source}: field {tags_field!r} is {found}")
    bio.validate_bio(words, tags, record.source, tags_field)
    return TaggedWords(list(words), list(tags), record.source)


def load_tagged(files: Sequence[str], tokens_field: str, tags_field: str, on_error: str, stats: DataStats,
                max_samples: int | None = None) -> list[TaggedWords]:
    """Read the tagged records of files in order (at most max_samples); on_error as in load_examples."""
    return load_validated(files, lambda record: to_tagged(record, tokens_field, tags_field), on_error, stats, max_samples)


def encode_tagged(records: Sequence[TaggedWords], tokenizer, tag2id: dict[str, int], word_separator: str,
                  data: DataConfig, stats: DataStats) -> list[dict]:
    """Rows {"input_ids", "labels": tag id on each word's first token, IGNORE_INDEX elsewhere}, fitted to
    data.max_length_tokens: truncation right keeps the first tokens (words cut off carry no label), drop
    leaves the record out; both counted in stats."""
    rows = []
    for record in records:
        input_ids, word_ids = bio.encode_words(record.words, tokenizer, word_separator)
        labels = bio.align_labels(word_ids, [tag2id[tag] for tag in record.tags])
        if len(input_ids) > data.max_length_tokens:
            if data.truncation == "drop":
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
            input_ids, labels = input_ids[: data.max_length_tokens], labels[: data.max_length_tokens]
        rows.append({"input_ids": input_ids, "labels": labels})
    return rows


def build_token_datasets(data: DataConfig, token_classify: TokenClassifyConfig, tokenizer, seed: int):
    """(train rows, validation rows, tag names, stats). Validation from data.validation_files or a seeded
    data.validation_ratio share; the tag names (class ids, bio.tag_names order) cover both splits.
    Raises DsftError for bad data (see to_tagged) or when no training row is left."""
    stats = DataStats()
    settings = token_classify
    train, validation = load_splits(data, lambda r: to_tagged(r, settings.tokens_field, settings.tags_field), stats, seed)
    tags = bio.tag_names([r.tags for r in [*train, *validation]])
    tag2id = {tag: i for i, tag in enumerate(tags)}
    encode = (tokenizer, tag2id, token_classify.word_separator, data, stats)
    train_rows, validation_rows = encode_tagged(train, *encode), encode_tagged(validation, *encode)
    stats.train_examples, stats.validation_examples = len(train_rows), len(validation_rows)
    stats.train_tokens = sum(len(row["input_ids"]) for row in train_rows)
    stats.trainable_tokens = sum(label != bio.IGNORE_INDEX for row in train_rows for label in row["labels"])
    if not train_rows:
        raise DsftError(f"no training examples left from data.train_files (records read: {stats.records_read}, "
                        f"skipped as bad: {stats.skipped_bad}, dropped as too long: {stats.dropped_too_long})")
    return train_rows, validation_rows, tags, stats


def words_to_predict(record: RawRecord, token_classify: TokenClassifyConfig) -> tuple[list[str], bool]:
    """(the words of a record to tag, whether they were split from its text field). A record holds either
    tokens_field (a word list) or, without it, a text split with bio.split_words; raises DsftError naming
    the record when it has neither or they are malformed."""
    if token_classify.tokens_field in record.data:
        return bio.validate_words(record.data[token_classify.tokens_field], record.source, token_classify.tokens_field), False
    text = record.data.get(TEXT_FIELD)
    if not isinstance(text, str):
        raise DsftError(f"{record.source}: no field {token_classify.tokens_field!r} (a list of words) and no "
                        f"field {TEXT_FIELD!r} (a text to split into words); one of them is needed")
    words = bio.split_words(text, token_classify.word_separator)
    if not words:
        raise DsftError(f"{record.source}: field {TEXT_FIELD!r} holds no word to tag")
    return words, True


def training_texts(files: Sequence[str], token_classify: TokenClassifyConfig, on_error: str,
                   max_samples: int | None):
    """The pieces bio.encode_words hands the tokenizer (each word, after the separator but the first), for
    training a preset's tokenizer. Byte-level merges learned on joined Chinese text cross character
    boundaries, leaving a character alone split into bytes whose first byte many characters share;
    learned on the pieces, merges stay inside words, so a word's first token tells it apart."""
    separator = bio.SEPARATORS[token_classify.word_separator]
    for record in load_tagged(files, token_classify.tokens_field, token_classify.tags_field, on_error,
                              DataStats(), max_samples):
        yield record.words[0]
        yield from (separator + word for word in record.words[1:])
