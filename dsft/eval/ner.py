"""Span-level NER metrics from BIO tags (seqeval), entity spans, and the report files of a run.

An entity counts as found only when its type and both ends match the reference (CoNLL's conlleval
rule, seqeval's default mode: an I- tag after O or another type starts a new entity, so malformed
predicted tags are still read as spans).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

REPORT_JSON = "ner_report.json"
REPORT_MD = "ner_report.md"
SCALAR_KEYS = ("precision", "recall", "f1", "macro_f1", "token_accuracy")
"""The report's single numbers (logged as eval_* at each evaluation)."""


def ner_report(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict:
    """Micro precision/recall/F1 over entity spans, macro F1 over entity types, per-type P/R/F1/support,
    and token_accuracy (the share of words whose tag is right, O included). Each word list pairs a
    sentence's reference tags with its predicted tags; raises ValueError when their lengths differ."""
    from seqeval.metrics import accuracy_score, classification_report

    if [len(r) for r in references] != [len(p) for p in predictions]:
        raise ValueError("references and predictions must hold the same number of tags per sentence")
    if not any(len(r) for r in references):
        return {key: 0.0 for key in SCALAR_KEYS} | {"per_type": {}, "entities": 0, "words": 0}
    table = classification_report(list(map(list, references)), list(map(list, predictions)), output_dict=True,
                                  zero_division=0)
    micro, macro = table.pop("micro avg"), table.pop("macro avg")
    table.pop("weighted avg", None)
    return {
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "macro_f1": float(macro["f1-score"]),
        "token_accuracy": float(accuracy_score(list(map(list, references)), list(map(list, predictions)))),
        "per_type": {name: _row(scores) for name, scores in sorted(table.items())},
        "entities": int(micro["support"]),
        "words": sum(len(r) for r in references),
    }


def _row(scores: dict) -> dict:
    return {"precision": float(scores["precision"]), "recall": float(scores["recall"]),
            "f1": float(scores["f1-score"]), "support": int(scores["support"])}


def report_markdown(report: dict) -> str:
    """The per-type table (and the micro and macro rows) as markdown."""
    lines = ["| type | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, row in report["per_type"].items():
        lines.append(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |")
    lines.append(f"| **micro** | {report['precision']:.4f} | {report['recall']:.4f} | {report['f1']:.4f} | "
                 f"{report['entities']} |")
    lines.append(f"| **macro** | | | {report['macro_f1']:.4f} | {report['entities']} |")
    return "\n".join(lines) + f"\n\nToken accuracy (words, O included): {report['token_accuracy']:.4f} over {report['words']} words.\n"


def write_report(run_dir: Path, report: dict) -> None:
    """ner_report.json and ner_report.md in run_dir."""
    (run_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (run_dir / REPORT_MD).write_text("# NER report (validation, span level)\n\n" + report_markdown(report),
                                     encoding="utf-8")
