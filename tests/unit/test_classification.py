"""Classification metrics: exact values by hand (scikit-learn computes them)."""

import pytest

from dsft.eval.classification import (
    OTHER,
    bootstrap_intervals,
    classification_report,
    normalize_label,
    plot_confusion_matrix,
)

PREDICTIONS = ["positive", "Negative.", "neutral", "positive", "maybe", "x"]
REFERENCES = ["positive", "negative", "negative", "positive", "neutral", None]


def test_report_by_hand():
    report = classification_report(PREDICTIONS, REFERENCES)
    assert report["labels"] == ["negative", "neutral", "positive", OTHER]
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["per_class"]["negative"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert report["per_class"]["neutral"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["per_class"]["positive"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert report["macro_f1"] == pytest.approx(5 / 9)
    # Micro over the known labels: 3 right, 1 wrong known label predicted, 2 references missed.
    assert report["micro_f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    assert report["confusion_matrix"] == [[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 2, 0], [0, 0, 0, 0]]


def test_label_normalization():
    assert normalize_label("  Positive. ") == "positive"
    assert normalize_label("正面。") == "正面"
    assert normalize_label("Ｐｏｓｉｔｉｖｅ") == "positive"


def test_bootstrap_is_deterministic_and_brackets_the_value():
    first = bootstrap_intervals(PREDICTIONS, REFERENCES, resamples=200, seed=0, confidence=0.9)
    assert first == bootstrap_intervals(PREDICTIONS, REFERENCES, resamples=200, seed=0, confidence=0.9)
    low, high = first["accuracy"]
    assert low <= 3 / 5 <= high
    assert bootstrap_intervals(PREDICTIONS, REFERENCES, resamples=0, seed=0, confidence=0.9) == {}


def test_confusion_matrix_png(tmp_path):
    out = tmp_path / "confusion.png"
    assert plot_confusion_matrix(classification_report(PREDICTIONS, REFERENCES), "target", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_confusion_matrix({}, "target", tmp_path / "none.png")
