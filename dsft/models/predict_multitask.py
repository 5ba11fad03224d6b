"""dsft predict for multitask runs: every head's prediction for each record, under "predictions".

A record gives its text as in training: multitask.tokens_field (a list of words) when a head tags
words, or else multitask.text_field; with token heads, a record without the word list may give a
text under text_field, split into words as the run's word_separator says. Records are encoded exactly
as in training and truncated to data.max_length_tokens; words cut off get "O" and the record gets
"truncated_words". Predictions go under one field, so they never overwrite a record's own label fields.
"""

from __future__ import annotations

from collections.abc import Sequence

from dsft.data import bio
from dsft.data.labels import text_of
from dsft.data.multitask import MultitaskCollator, encode_input, reads_words
from dsft.data.read import RawRecord
from dsft.errors import DsftError
from dsft.models.predict import check_known_label

PREDICTIONS_FIELD = "predictions"


def predict_heads(model, tokenizer, config, records: Sequence[RawRecord]) -> list[dict]:
    """{"predictions": {head: prediction}} per record: a sequence head's {"label", "scores": {label:
    probability}}, a token head's {"tags": one per word, "entities": [{"type", "start_word", "end_word"
    (exclusive), "text"}]}; plus "words" when split from the text and "truncated_words" when some were
    cut off. A record that carries a head's label field must hold labels the run knows (DsftError naming
    the record otherwise), as must a record without its text."""
    settings = config.multitask
    labels = {spec.name: spec.labels for spec in model.head_specs}
    words_per_record, from_text = zip(*[_words(record, settings) for record in records])
    for record, words in zip(records, words_per_record):
        _check_known_labels(record, words, settings.heads, labels)
    texts = [None if words is not None else text_of(record, settings.text_field)
             for record, words in zip(records, words_per_record)]
    encoded = [encode_input(words, text, tokenizer, settings.word_separator) for words, text in zip(words_per_record, texts)]
    ids_per_record = [input_ids[: config.data.max_length_tokens] for input_ids, _ in encoded]
    batch = MultitaskCollator(tokenizer.pad_token_id, [])([{"input_ids": ids} for ids in ids_per_record])
    batch = {key: value.to(model.device) for key, value in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    results = [{PREDICTIONS_FIELD: {}} for _ in records]
    for spec in model.head_specs:
        if spec.kind == "sequence":
            for result, row in zip(results, logits[spec.name].float().softmax(-1).tolist()):
                best = max(range(len(row)), key=row.__getitem__)
                result[PREDICTIONS_FIELD][spec.name] = {"label": spec.labels[best], "scores": dict(zip(spec.labels, row))}
        else:
            word_ids = [word_ids[: len(ids)] for (_, word_ids), ids in zip(encoded, ids_per_record)]
            _add_word_tags(results, spec, logits[spec.name].argmax(-1).tolist(), word_ids, words_per_record,
                           bio.SEPARATORS[settings.word_separator])
    for result, words, split in zip(results, words_per_record, from_text):
        if split:
            result["words"] = words
    return results


def _add_word_tags(results: list[dict], spec, predicted_BL: list[list[int]], word_ids_per_record, words_per_record,
                   separator: str) -> None:
    """Each record's tags (read from each word's first token; "O" for words cut off) and entities for a token head."""
    for result, predicted_L, word_ids, words in zip(results, predicted_BL, word_ids_per_record, words_per_record):
        tag_ids = bio.word_predictions(word_ids, predicted_L[: len(word_ids)], len(words), missing=-1)
        tags = [spec.labels[t] if t >= 0 else "O" for t in tag_ids]
        result[PREDICTIONS_FIELD][spec.name] = {"tags": tags, "entities": bio.entity_spans(words, tags, separator)}
        if tag_ids.count(-1):
            result["truncated_words"] = tag_ids.count(-1)


def _words(record: RawRecord, settings) -> tuple[list[str] | None, bool]:
    """(the record's words, whether they were split from its text); (None, False) when no head tags words.
    Raises DsftError naming the record when it has neither words nor a text."""
    if not reads_words(settings):
        return None, False
    if settings.tokens_field in record.data:
        return bio.validate_words(record.data[settings.tokens_field], record.source, settings.tokens_field), False
    text = record.data.get(settings.text_field)
    if not isinstance(text, str) or not bio.split_words(text, settings.word_separator):
        raise DsftError(f"{record.source}: needs field {settings.tokens_field!r} (a list of words) or a non-empty "
                        f"text in field {settings.text_field!r}")
    return bio.split_words(text, settings.word_separator), True


def _check_known_labels(record: RawRecord, words, heads, labels: dict[str, list[str]]) -> None:
    """Labels present in a record to predict must be ones the run knows, or comparing against them means nothing."""
    for head in heads:
        if head.kind == "sequence":
            check_known_label(record, head.label_field, labels[head.name])
            continue
        given = record.data.get(head.label_field)
        if given is None:
            continue
        if not isinstance(given, list):
            raise DsftError(f"{record.source}: field {head.label_field!r} must be a list of BIO tags")
        bio.validate_bio(words, given, record.source, head.label_field)
        unknown = sorted(set(given) - set(labels[head.name]))
        if unknown:
            raise DsftError(f"{record.source}: field {head.label_field!r} holds {', '.join(map(repr, unknown))}, not "
                            f"seen in training; the run knows: {', '.join(labels[head.name])}")
