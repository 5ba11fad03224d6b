"""Error analysis of a classifier's evaluation: the confusion matrix as a table and a heat map, and
the most confused (reference, prediction) pairs with example texts.

Written into one directory per evaluation (RUN/eval/step-N during training, the --out dir of
dsft eval): confusion_matrix.png, confusion_matrix.md (table and worst pairs) and
worst_confusions.json.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from dsft.eval.classification import plot_confusion_matrix


def worst_confusions(predictions: Sequence[str], references: Sequence[str], texts: Sequence[str],
                     top_pairs: int = 5, examples_per_pair: int = 3) -> list[dict]:
    """The most frequent wrong (reference, prediction) pairs, most frequent first (ties by name).

    Each: reference, prediction, count, share of that reference's examples, and up to
    examples_per_pair texts in data order.
    """
    wrong = Counter((r, p) for p, r in zip(predictions, references) if r is not None and p != r)
    per_reference = Counter(r for r in references if r is not None)
    pairs = sorted(wrong.items(), key=lambda item: (-item[1], item[0]))[:top_pairs]
    result = []
    for (reference, prediction), count in pairs:
        examples = [t for t, p, r in zip(texts, predictions, references) if (r, p) == (reference, prediction)]
        result.append({"reference": reference, "prediction": prediction, "count": count,
                       "share_of_reference": round(count / per_reference[reference], 4),
                       "examples": examples[:examples_per_pair]})
    return result


def confusion_markdown(report: dict) -> list[str]:
    """The confusion matrix as a markdown table: rows are references, columns predictions."""
    labels, matrix = report["labels"], report["confusion_matrix"]
    lines = ["| reference \\ prediction | " + " | ".join(_cell(label) for label in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for label, row in zip(labels, matrix):
        lines.append(f"| {_cell(label)} | " + " | ".join(str(count) for count in row) + " |")
    return lines


def worst_markdown(pairs: list[dict]) -> list[str]:
    if not pairs:
        return ["No confusions: every prediction matched its reference."]
    lines = []
    for pair in pairs:
        lines.append(f"- **{_cell(pair['reference'])}** predicted as **{_cell(pair['prediction'])}**: {pair['count']} "
                     f"({pair['share_of_reference']:.0%} of {_cell(pair['reference'])})")
        lines += [f"  - {_cell(text[:200])}" for text in pair["examples"]]
    return lines


def write_error_analysis(out_dir: Path, report: dict, predictions: Sequence[str], references: Sequence[str],
                         texts: Sequence[str], title: str) -> list[dict]:
    """Write confusion_matrix.png, confusion_matrix.md and worst_confusions.json into out_dir; returns the pairs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = worst_confusions(predictions, references, texts)
    plot_confusion_matrix(report, title, out_dir / "confusion_matrix.png")
    headline = (f"accuracy {report['accuracy']:.4f}, macro F1 {report['macro_f1']:.4f}, "
                f"micro F1 {report['micro_f1']:.4f}")
    lines = [f"# {title}", "", headline, "", "## Confusion matrix", "", *confusion_markdown(report), "",
             "## Most confused pairs", "", *worst_markdown(pairs), ""]
    (out_dir / "confusion_matrix.md").write_text("\n".join(lines), encoding="utf-8")
    (out_dir / "worst_confusions.json").write_text(json.dumps(pairs, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return pairs


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell or list item (one line, no column breaks)."""
    return " ".join(str(text).split()).replace("|", "\\|")
