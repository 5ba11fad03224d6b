"""Pure pieces of classification: labels, class weights, losses, config rules."""

import json

import pytest
import torch
import torch.nn.functional as F

from dsft.config import dump_config, validate_config
from dsft.data.dataset import DataStats
from dsft.data.labels import balanced_class_weights, label_names, load_labelled
from dsft.errors import DsftError
from dsft.train.classify import classification_loss

BASE = {"model": {"preset": "tiny-qwen2"}, "data": {"train_files": ["x.jsonl"]}}


def test_balanced_weights_of_a_3_to_1_dataset():
    # 8 samples, 2 classes: 6 of class 0, 2 of class 1 -> 8/(2*6), 8/(2*2).
    assert balanced_class_weights([0, 0, 0, 1, 0, 0, 1, 0], 2) == [8 / 12, 2.0]
    assert balanced_class_weights([0, 0, 2], 3) == [0.5, 1.0, 1.0]  # 3/(3*2), none of class 1, 3/(3*1)


def test_focal_with_gamma_zero_equals_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(10, 4), torch.randint(0, 4, (10,))
    weights = [0.5, 1.0, 2.0, 1.5]
    for smoothing in (0.0, 0.1):
        expected = F.cross_entropy(logits, labels, weight=torch.tensor(weights), label_smoothing=smoothing)
        got = classification_loss(logits, labels, weights, "focal", focal_gamma=0.0, label_smoothing=smoothing)
        torch.testing.assert_close(got, expected)
        ce = classification_loss(logits, labels, weights, "cross_entropy", label_smoothing=smoothing)
        torch.testing.assert_close(ce, expected)
    torch.testing.assert_close(classification_loss(logits, labels), F.cross_entropy(logits, labels))


def test_focal_loss_down_weights_easy_examples():
    logits, labels = torch.tensor([[4.0, 0.0], [0.0, 0.5]]), torch.tensor([0, 1])
    p_true = logits.softmax(-1)[[0, 1], labels]
    expected = ((1 - p_true) ** 2 * F.cross_entropy(logits, labels, reduction="none")).mean()
    torch.testing.assert_close(classification_loss(logits, labels, loss="focal", focal_gamma=2.0), expected)


def test_accumulated_micro_batches_sum_to_the_full_batch_mean():
    logits, labels = torch.randn(8, 3), torch.randint(0, 3, (8,))
    parts = classification_loss(logits[:6], labels[:6], num_items_in_batch=8) + classification_loss(logits[6:], labels[6:], num_items_in_batch=8)
    torch.testing.assert_close(parts, F.cross_entropy(logits, labels))


def test_label_names_sort_integers_numerically():
    assert label_names(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_names(["b", "a", "10"]) == ["10", "a", "b"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_bad_records_name_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b"}, {"text": 3, "label": "x"},
                                              {"text": "c", "label": True}])
    with pytest.raises(DsftError, match=r"d\.jsonl:2: field 'label' is missing"):
        load_labelled([path], "text", "label", "error", DataStats())
    stats = DataStats()
    records = load_labelled([path], "text", "label", "skip", stats)
    assert [(r.text, r.label) for r in records] == [("a", "1")]
    assert stats.records_read == 4 and stats.skipped_bad == 3
    assert "d.jsonl:3: field 'text' is a number, not a string" in stats.skip_reasons[1]


def test_classify_section_needs_task_classification():
    with pytest.raises(DsftError, match="classify is set but task is 'causal_lm'"):
        validate_config({**BASE, "classify": {"loss": "focal"}})
    with pytest.raises(DsftError, match="classify.head_only needs method.type full"):
        validate_config({**BASE, "task": "classification", "classify": {"head_only": True}})
    with pytest.raises(DsftError, match="label_smoothing"):
        validate_config({**BASE, "task": "classification", "classify": {"label_smoothing": 1.0}})


def test_dumped_configs_load_back():
    for raw in (BASE, {**BASE, "task": "classification", "classify": {"loss": "focal"}}):
        import yaml

        config = validate_config(raw)
        assert validate_config(yaml.safe_load(dump_config(config))) == config
