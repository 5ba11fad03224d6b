"""dsft predict for token classification runs: a BIO tag per word and the entities they mark.

A record gives its words in token_classify.tokens_field or, without it, a text under "text" split
into words as the run's word_separator says. Words are encoded exactly as in training
(dsft.data.bio.encode_words) and truncated to data.max_length_tokens; a word cut off gets "O" and
the record gets "truncated_words".
"""

from __future__ import annotations

from collections.abc import Sequence

from dsft.data import bio
from dsft.data.read import RawRecord
from dsft.data.tokens import words_to_predict
from dsft.errors import DsftError


def predict_tags(model, tokenizer, config, records: Sequence[RawRecord]) -> list[dict]:
    """{"tags": one per word, "entities": [{"type", "start_word", "end_word" (exclusive), "text"}]} per
    record, plus "words" when they were split from the text and "truncated_words" when some were cut off.
    A record that carries the tags field must hold valid BIO tags the run was trained on (DsftError
    naming the record otherwise)."""
    tc = config.token_classify
    tags = [model.config.id2label[i] for i in range(model.config.num_labels)]
    words_per_record, from_text = [], []
    for record in records:
        words, split = words_to_predict(record, tc)
        check_known_tags(record, words, tc.tags_field, tags)
        words_per_record.append(words)
        from_text.append(split)
    encoded = [bio.encode_words(words, tokenizer, tc.word_separator) for words in words_per_record]
    max_tokens = config.data.max_length_tokens
    ids_per_record = [input_ids[:max_tokens] for input_ids, _ in encoded]
    predicted_per_record = _token_predictions(model, tokenizer, ids_per_record)
    separator = bio.SEPARATORS[tc.word_separator]
    return [_record_result(words, split, word_ids, predicted_T, tags, separator)
            for words, split, (_, word_ids), predicted_T in zip(words_per_record, from_text, encoded, predicted_per_record)]


def _record_result(words: list[str], split: bool, word_ids, predicted_T: list[int], tags: list[str],
                   separator: str) -> dict:
    """One record's fields: each word's tag read from its first token ("O" when truncation cut it off)."""
    word_tag_ids = bio.word_predictions(word_ids[: len(predicted_T)], predicted_T, len(words), missing=-1)
    word_tags = [tags[i] if i >= 0 else "O" for i in word_tag_ids]
    result = {"tags": word_tags, "entities": bio.entity_spans(words, word_tags, separator)}
    if split:
        result["words"] = words
    cut_off = word_tag_ids.count(-1)
    if cut_off:
        result["truncated_words"] = cut_off
    return result


def check_known_tags(record: RawRecord, words: Sequence[str], tags_field: str, tags: Sequence[str]) -> None:
    """Tags present in a record to predict must be valid BIO for its words and known to the model."""
    given = record.data.get(tags_field)
    if given is None:
        return
    if not isinstance(given, list):
        raise DsftError(f"{record.source}: field {tags_field!r} must be a list of BIO tags")
    bio.validate_bio(words, given, record.source, tags_field)
    unknown = sorted(set(given) - set(tags))
    if unknown:
        raise DsftError(f"{record.source}: field {tags_field!r} holds {', '.join(map(repr, unknown))}, not seen in "
                        f"training; the run knows: {', '.join(tags)}")


def _token_predictions(model, tokenizer, ids_per_record: list[list[int]]) -> list[list[int]]:
    """Argmax tag id of every token of each record, padded as in training (the tokenizer's side)."""
    from transformers import DataCollatorForTokenClassification

    batch = DataCollatorForTokenClassification(tokenizer)([{"input_ids": ids} for ids in ids_per_record])
    batch = {key: value.to(model.device) for key, value in batch.items()}
    predicted_BT = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    # The attention mask picks each record's own tokens, whichever side the padding is on.
    return [row[mask.bool()].tolist() for row, mask in zip(predicted_BT, batch["attention_mask"])]
