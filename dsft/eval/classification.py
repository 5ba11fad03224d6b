"""Classification metrics: accuracy, per-class precision/recall/F1, macro and micro F1, confusion matrix.

Used by `dsft eval` with `eval.task: classification`, where a generative model answers with a
label (the references are the labels), and by classifier runs. Numbers come from scikit-learn.
An answer that matches no known label counts as the extra class OTHER, so it is never right.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path

OTHER = "(other)"


def normalize_label(text: str) -> str:
    """Compare labels without case, surrounding space or trailing punctuation ("Positive." == "positive")."""
    text = unicodedata.normalize("NFKC", text).strip().casefold()
    return re.sub(r"[\s\W]+$", "", text)


def classification_report(predictions: Sequence[str], references: Sequence[str], normalize: bool = True) -> dict:
    """Metrics of predicted labels against reference labels (pairs with a None reference are left out).

    normalize compares labels as normalize_label does (for generated answers); a classifier's
    labels are exact names and pass normalize=False.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    norm = normalize_label if normalize else str
    pairs = [(p, r) for p, r in zip(predictions, references) if r is not None]
    labels = sorted({norm(r) for _, r in pairs})
    known = set(labels)
    y_true = [norm(r) for _, r in pairs]
    y_pred = [norm(p) if norm(p) in known else OTHER for p, _ in pairs]
    columns = labels + ([OTHER] if OTHER in y_pred else [])
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)[2]),
        "micro_f1": float(precision_recall_fscore_support(y_true, y_pred, labels=labels, average="micro", zero_division=0)[2]),
        "per_class": {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for label, p, r, f, s in zip(labels, precision, recall, f1, support)},
        "labels": columns,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=columns).tolist(),
    }


def bootstrap_intervals(predictions: Sequence[str], references: Sequence[str], resamples: int, seed: int,
                        confidence: float) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of accuracy and macro F1 over resampled (prediction, reference) pairs."""
    import numpy as np

    from dsft.eval.text_metrics import resample_indices

    pairs = [(p, r) for p, r in zip(predictions, references) if r is not None]
    if resamples == 0 or not pairs:
        return {}
    values: dict[str, list[float]] = {"accuracy": [], "macro_f1": []}
    for indices in resample_indices(len(pairs), resamples, seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a resample may hold a single label; that is fine here
            report = classification_report([pairs[i][0] for i in indices], [pairs[i][1] for i in indices])
        for name in values:
            values[name].append(report[name])
    tail = (1 - confidence) / 2 * 100
    return {name: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] for name, v in values.items()}


def plot_confusion_matrix(report: dict, title: str, out_png: Path) -> bool:
    """A confusion-matrix heat map (rows: reference, columns: prediction); False when there is nothing to draw."""
    from dsft.plots import new_figure, save_png

    matrix, labels = report.get("confusion_matrix"), report.get("labels")
    if not matrix or not labels:
        return False
    size_in = 2.5 + 0.5 * len(labels)
    figure = new_figure(size_in, size_in)
    axes = figure.add_subplot()
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(matrix)), labels[: len(matrix)])
    axes.set_xlabel("prediction")
    axes.set_ylabel("reference")
    axes.set_title(title)
    for row, counts in enumerate(matrix):
        for column, count in enumerate(counts):
            axes.text(column, row, str(count), ha="center", va="center")
    save_png(figure, out_png)
    return True


def classification_markdown(results: dict) -> list[str]:
    """report.md lines: per-class precision, recall, F1 and support for each model that has them."""
    lines = []
    for role, section in results["models"].items():
        report = section.get("classification")
        if not report:
            continue
        lines += [f"## Classification: {role}", "", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        for label, row in report["per_class"].items():
            lines.append(f"| {label.replace('|', chr(92) + '|')} | {row['precision']:.3f} | {row['recall']:.3f} | "
                         f"{row['f1']:.3f} | {row['support']} |")
        lines += ["", f"accuracy {report['accuracy']:.3f}, macro F1 {report['macro_f1']:.3f}, "
                      f"micro F1 {report['micro_f1']:.3f}", ""]
    return lines
