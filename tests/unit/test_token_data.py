"""Token classification data and metrics: tagged records read and validated (file:line errors, skip counts),
truncation right and drop, the validation split and tag list, seqeval span metrics, entity spans, word tags
read from first tokens."""

import json

import numpy as np
import pytest

from dsft.config import DataConfig, TokenClassifyConfig
from dsft.data.bio import IGNORE_INDEX, encode_words
from dsft.data.dataset import DataStats
from dsft.data.read import RawRecord
from dsft.data.tokens import build_token_datasets, load_tagged, training_texts, words_to_predict
from dsft.errors import DsftError
from dsft.data.bio import entity_spans
from dsft.eval.ner import ner_report, report_markdown
from dsft.train.token_classify import token_classification_loss, word_tags

GOOD = [{"tokens": ["Alice", "lives", "in", "New", "York"], "tags": ["B-PER", "O", "O", "B-LOC", "I-LOC"]},
        {"tokens": ["Bruno", "Novak", "works"], "tags": ["B-PER", "I-PER", "O"]}]


def write_jsonl(path, records):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("record, message", [
    ({"words": ["a"], "tags": ["O"]}, "field 'tokens' is missing"),
    ({"tokens": ["a"]}, "field 'tags' is missing"),
    ({"tokens": ["a"], "tags": "O"}, "field 'tags' is a string, not a list of tags"),
    ({"tokens": ["a", "b"], "tags": ["O"]}, "field 'tags' has 1 tags for 2 words"),
    ({"tokens": ["a", "b"], "tags": ["O", "I-PER"]}, "tag 1 'I-PER' follows 'O'"),
])
def test_bad_record_names_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [*GOOD, record])
    with pytest.raises(DsftError) as error:
        load_tagged([str(path)], "tokens", "tags", "error", DataStats())
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)


def test_skip_counts_bad_and_unreadable_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], "not json\n", {"tokens": ["a"], "tags": []}, GOOD[1]])
    stats = DataStats()
    records = load_tagged([str(path)], "tokens", "tags", "skip", stats)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:4"]
    assert stats.records_read == 4 and stats.skipped_bad == 2
    assert f"{path}:3: field 'tags' has 0 tags for 1 words" in stats.skip_reasons[1]


def test_truncation_right_keeps_first_tokens_and_drop_leaves_the_record_out(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    long_ids, _ = encode_words(GOOD[0]["tokens"], tokenizer, "space")
    short_ids, _ = encode_words(GOOD[1]["tokens"], tokenizer, "space")
    limit = max(len(short_ids), 8)
    assert len(long_ids) > limit
    for truncation, train_count in (("right", 2), ("drop", 1)):
        data = DataConfig(train_files=[str(path)], max_length_tokens=limit, truncation=truncation)
        rows, validation, tags, stats = build_token_datasets(data, TokenClassifyConfig(), tokenizer, seed=0)
        assert len(rows) == train_count and validation == []
        assert (stats.truncated, stats.dropped_too_long) == ((1, 0) if truncation == "right" else (0, 1))
        assert all(len(row["input_ids"]) == len(row["labels"]) <= limit for row in rows)
        assert tags == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    first = build_token_datasets(DataConfig(train_files=[str(path)], max_length_tokens=limit), TokenClassifyConfig(),
                                 tokenizer, seed=0)[0][0]
    assert first["labels"][0] == 3 and first["input_ids"] == long_ids[:limit]


def test_validation_ratio_split_and_tags_over_both_splits(tmp_path, tokenizer):
    records = [GOOD[i % 2] for i in range(9)] + [{"tokens": ["Acme"], "tags": ["B-ORG"]}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    data = DataConfig(train_files=[str(path)], validation_ratio=0.2)
    rows, validation, tags, stats = build_token_datasets(data, TokenClassifyConfig(), tokenizer, seed=0)
    assert (len(rows), len(validation)) == (8, 2) and (stats.train_examples, stats.validation_examples) == (8, 2)
    assert tags == ["O", "B-LOC", "I-LOC", "B-ORG", "B-PER", "I-PER"]
    assert stats.trainable_tokens == sum(label != IGNORE_INDEX for row in rows for label in row["labels"])


def test_training_texts_are_the_pieces_the_model_encodes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"tokens": ["张", "三", "在"], "tags": ["B-PER", "I-PER", "O"]}])
    assert list(training_texts([str(path)], TokenClassifyConfig(word_separator="none"), "error", None)) == ["张", "三", "在"]
    path = write_jsonl(tmp_path / "e.jsonl", [GOOD[1]])
    assert list(training_texts([str(path)], TokenClassifyConfig(), "error", None)) == ["Bruno", " Novak", " works"]


def test_words_to_predict_from_words_or_text():
    config = TokenClassifyConfig(word_separator="none")
    assert words_to_predict(RawRecord({"tokens": ["张", "三"]}, "f:1"), config) == (["张", "三"], False)
    assert words_to_predict(RawRecord({"text": "张三 在"}, "f:2"), config) == (["张", "三", "在"], True)
    with pytest.raises(DsftError, match="^f:3: no field 'tokens'"):
        words_to_predict(RawRecord({"body": "x"}, "f:3"), config)
    with pytest.raises(DsftError, match="^f:4: field 'text' holds no word"):
        words_to_predict(RawRecord({"text": "  "}, "f:4"), config)


def test_ner_report_counts_spans_exactly():
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "I-LOC", "O"]]
    predictions = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "O", "B-PER"]]
    report = ner_report(references, predictions)
    # PER: 1 right of 2 predicted, 1 reference; LOC: 0 right of 1 predicted ("B-LOC O" ends early), 2 references.
    assert report["per_type"]["PER"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert report["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert report["precision"] == pytest.approx(1 / 3) and report["recall"] == pytest.approx(1 / 3)
    assert report["f1"] == pytest.approx(1 / 3) and report["macro_f1"] == pytest.approx(1 / 3)
    assert report["token_accuracy"] == pytest.approx(4 / 7) and (report["entities"], report["words"]) == (3, 7)
    assert "| PER | 0.5000 | 1.0000 | 0.6667 | 1 |" in report_markdown(report)


def test_entity_spans_have_exclusive_ends_and_joined_text():
    words, tags = ["Alice", "Smith", "in", "New", "York", "and", "Lima"], ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", "I-LOC"]
    assert entity_spans(words, tags, " ") == [
        {"type": "PER", "start_word": 0, "end_word": 2, "text": "Alice Smith"},
        {"type": "LOC", "start_word": 3, "end_word": 5, "text": "New York"},
        {"type": "LOC", "start_word": 6, "end_word": 7, "text": "Lima"},  # an I- after O starts an entity, as in the metrics
    ]
    assert entity_spans(["北", "京"], ["B-LOC", "I-LOC"], "")[0]["text"] == "北京"


def test_word_tags_read_the_labelled_tokens_of_padded_batches():
    tags = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    label_ids_BT = np.array([[3, IGNORE_INDEX, 0, 1], [1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    predicted_ids_BT = np.array([[3, 1, 0, 0], [1, 2, 4, IGNORE_INDEX]])
    references, predictions = word_tags(predicted_ids_BT, label_ids_BT, tags)
    assert references == [["B-PER", "O", "B-LOC"], ["B-LOC", "I-LOC"]]
    assert predictions == [["B-PER", "O", "O"], ["B-LOC", "I-LOC"]]


def test_token_loss_divides_by_the_tagged_tokens_of_the_whole_step():
    """Alone: the mean over tagged tokens (the model's own loss). Micro-batches of a step, each divided by the step's
    tagged tokens, sum to the mean over the whole step, whatever each one holds."""
    import torch
    import torch.nn.functional as F
    from transformers.modeling_outputs import TokenClassifierOutput

    logits_BTC = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    labels_BT = torch.tensor([[1, -100, 2, 0], [4, 4, -100, -100], [-100, -100, -100, 3]])
    whole = F.cross_entropy(logits_BTC.reshape(-1, 5), labels_BT.reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(token_classification_loss(TokenClassifierOutput(logits=logits_BTC), labels_BT), whole)
    tagged = torch.tensor(6)  # 3 + 2 + 1 tagged tokens in the step
    parts = [token_classification_loss(TokenClassifierOutput(logits=logits_BTC[rows]), labels_BT[rows], tagged)
             for rows in (slice(0, 1), slice(1, 3))]
    assert torch.allclose(sum(parts), whole)
    no_tags = torch.full((1, 4), IGNORE_INDEX)
    assert token_classification_loss(TokenClassifierOutput(logits=logits_BTC[:1]), no_tags).item() == 0.0
