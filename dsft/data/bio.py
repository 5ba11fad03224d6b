"""Words with BIO tags, and their exact alignment to subword tokens.

Each word is encoded on its own (after the separator for every word but the first), so a word
boundary is always a token boundary, in Chinese as in English: a tokenizer merge across two
characters would otherwise leave one of them without a token of its own. The first token of a
word carries the word's tag; its other tokens carry -100 (no loss), and predictions are read back
from first tokens. Training and prediction encode the same way, so they see the same ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from dsft.errors import DsftError

IGNORE_INDEX = -100
SEPARATORS = {"space": " ", "none": ""}
_TAG = re.compile(r"^(O|[BI]-\S+)$")


def validate_bio(words: Sequence, tags: Sequence, source: str, tags_field: str) -> None:
    """Raise DsftError naming the record when tags do not fit words or break the BIO scheme."""
    if len(words) != len(tags):
        raise DsftError(f"{source}: field {tags_field!r} has {len(tags)} tags for {len(words)} words; "
                        "give exactly one BIO tag per word")
    previous = "O"
    for i, tag in enumerate(tags):
        if not isinstance(tag, str) or not _TAG.match(tag):
            raise DsftError(f"{source}: field {tags_field!r} tag {i} is {tag!r}; allowed: O, B-TYPE, I-TYPE")
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            raise DsftError(f"{source}: field {tags_field!r} tag {i} {tag!r} follows {previous!r}; in BIO an entity "
                            f"starts with B-{tag[2:]} (word {i}: {words[i]!r})")
        previous = tag


def validate_words(words, source: str, tokens_field: str) -> list[str]:
    """The record's words; raises DsftError naming the record when they are not a non-empty list of non-blank strings."""
    if not isinstance(words, list) or not words:
        raise DsftError(f"{source}: field {tokens_field!r} must be a non-empty list of words")
    for i, word in enumerate(words):
        if not isinstance(word, str) or not word.strip():
            raise DsftError(f"{source}: field {tokens_field!r} word {i} is {word!r}; words are non-blank strings")
    return words


def split_words(text: str, word_separator: str) -> list[str]:
    """Words of a plain text: split on white space (space), or one word per non-space character (none)."""
    return text.split() if word_separator == "space" else [char for char in text if not char.isspace()]


def tag_names(tag_lists: Sequence[Sequence[str]]) -> list[str]:
    """The distinct tags, O first, then sorted by entity type with B before I (the class ids)."""
    distinct = {tag for tags in tag_lists for tag in tags} - {"O"}
    return ["O", *sorted(distinct, key=lambda tag: (tag[2:], tag[0]))]


def encode_words(words: Sequence[str], tokenizer, word_separator: str) -> tuple[list[int], list[int | None]]:
    """(input ids, word index of each token: None for the tokenizer's BOS/EOS framing)."""
    separator = SEPARATORS[word_separator]
    prefix, suffix = _framing(tokenizer)
    input_ids, word_ids = list(prefix), [None] * len(prefix)
    for index, word in enumerate(words):
        piece = word if index == 0 else separator + word
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        input_ids += ids
        word_ids += [index] * len(ids)
    return input_ids + suffix, word_ids + [None] * len(suffix)


def _framing(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. [BOS], [])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(framed) - len(plain) + 1) if framed[i:i + len(plain)] == plain), 0)
    return framed[:start], framed[start + len(plain):]


def align_labels(word_ids: Sequence[int | None], word_label_ids: Sequence[int]) -> list[int]:
    """Token labels: the word's label id on its first token, IGNORE_INDEX elsewhere."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(word_label_ids[word] if word is not None and word != previous else IGNORE_INDEX)
        previous = word
    return labels


def word_predictions(word_ids: Sequence[int | None], token_predictions: Sequence[int], num_words: int,
                     missing: int = 0) -> list[int]:
    """Each word's prediction, read from its first token; `missing` for words cut off by truncation."""
    predictions = [missing] * num_words
    seen = set()
    for word, prediction in zip(word_ids, token_predictions):
        if word is not None and word not in seen:
            seen.add(word)
            predictions[word] = int(prediction)
    return predictions


def entity_spans(words: Sequence[str], tags: Sequence[str], separator: str) -> list[dict]:
    """The entities the tags mark, read as ner_report reads them: {"type", "start_word", "end_word"
    (exclusive), "text" (the words joined by separator)}, in order."""
    from seqeval.metrics.sequence_labeling import get_entities

    spans = []
    for entity_type, start, last in get_entities(list(tags)):
        spans.append({"type": entity_type, "start_word": start, "end_word": last + 1,
                      "text": separator.join(words[start:last + 1])})
    return spans
