"""Error analysis of classifier evaluations: exact worst pairs, tables and files."""

import json

from dsft.eval.classification import classification_report
from dsft.eval.error_analysis import confusion_markdown, worst_confusions, write_error_analysis

REFERENCES = ["cat", "cat", "cat", "dog", "dog", "bird", "bird", "bird"]
PREDICTIONS = ["cat", "dog", "dog", "cat", "dog", "dog", "cat", "bird"]
TEXTS = [f"text {i}" for i in range(8)]


def test_worst_confusions_are_counted_and_ordered_exactly():
    pairs = worst_confusions(PREDICTIONS, REFERENCES, TEXTS, top_pairs=3, examples_per_pair=1)
    assert pairs == [
        {"reference": "cat", "prediction": "dog", "count": 2, "share_of_reference": 0.6667, "examples": ["text 1"]},
        {"reference": "bird", "prediction": "cat", "count": 1, "share_of_reference": 0.3333, "examples": ["text 6"]},
        {"reference": "bird", "prediction": "dog", "count": 1, "share_of_reference": 0.3333, "examples": ["text 5"]},
    ]
    assert worst_confusions(REFERENCES, REFERENCES, TEXTS) == []


def test_confusion_table_rows_are_references_and_columns_predictions():
    report = classification_report(PREDICTIONS, REFERENCES, normalize=False)
    assert confusion_markdown(report) == [
        "| reference \\ prediction | bird | cat | dog |",
        "|---|---|---|---|",
        "| bird | 1 | 1 | 1 |",
        "| cat | 0 | 1 | 2 |",
        "| dog | 0 | 1 | 1 |",
    ]


def test_labels_keep_their_case_without_normalizing():
    report = classification_report(["Yes", "no"], ["Yes", "No"], normalize=False)
    assert report["labels"] == ["No", "Yes", "(other)"] and report["accuracy"] == 0.5


def test_write_error_analysis_writes_png_table_and_pairs(tmp_path):
    report = classification_report(PREDICTIONS, REFERENCES, normalize=False)
    write_error_analysis(tmp_path / "step-5", report, PREDICTIONS, REFERENCES, TEXTS, "validation at step 5")
    out = tmp_path / "step-5"
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "confusion_matrix.md").read_text(encoding="utf-8")
    assert "| cat | 0 | 1 | 2 |" in markdown and "**cat** predicted as **dog**: 2 (67% of cat)" in markdown
    assert json.loads((out / "worst_confusions.json").read_text())[0]["examples"] == ["text 1", "text 2"]
