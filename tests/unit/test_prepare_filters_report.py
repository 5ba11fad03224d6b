"""Filters, fingerprints and the report of `dsft data prepare`, with hand-computed values."""

import copy
import hashlib
import json

import pytest

from dsft.data.filters import (
    classifier_reason,
    language_reason,
    language_shares,
    length_reason,
    quality_reason,
    repetition_ratio,
    symbol_ratio,
)
from dsft.data.fingerprint import (
    Fingerprint,
    canonical_line,
    fingerprint_records,
    read_fingerprint,
    write_fingerprint,
)
from dsft.data.prepare_config import ClassifierFilterStep, LanguageFilterStep, LengthFilterStep, QualityFilterStep
from dsft.data.prepare_report import length_stats, write_prepare_report
from dsft.errors import DsftError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- filters


def test_length_reason_bounds():
    step = LengthFilterStep(step="filter_length", min_tokens=3, max_tokens=5)
    assert [length_reason(n, step) for n in (2, 3, 5, 6)] == ["too_few_tokens", None, None, "too_many_tokens"]
    unbounded = LengthFilterStep(step="filter_length")
    assert length_reason(10**9, unbounded) is None
    assert length_reason(0, unbounded) == "too_few_tokens"


def test_language_shares_by_script():
    # letters H e l l o 世 界: 2 Han, 5 Latin
    assert language_shares("Hello, 世界!") == {"zh": 2 / 7, "en": 5 / 7}
    assert language_shares("café") == {"zh": 0.0, "en": 1.0}
    # kana are letters of neither language: 5 kana + 2 Han
    assert language_shares("こんにちは世界") == {"zh": 2 / 7, "en": 0.0}
    assert language_shares("123 !!!") == {"zh": 0.0, "en": 0.0}


def test_language_reason():
    zh_only = LanguageFilterStep(step="filter_language", languages=["zh"])
    assert language_reason("Hello, 世界!", zh_only) == "language"
    assert language_reason("你好世界 ok", zh_only) is None  # 4 Han of 6 letters
    either = LanguageFilterStep(step="filter_language", languages=["zh", "en"], min_share=0.9)
    assert language_reason("Hello, 世界!", either) == "language"  # 5/7 and 2/7 both under 0.9
    assert language_reason("12345 ???", zh_only) is None  # no letters: kept
    exact = LanguageFilterStep(step="filter_language", languages=["en"], min_share=5 / 7)
    assert language_reason("Hello, 世界!", exact) is None  # a share equal to min_share is kept


def test_repetition_ratio_english_words():
    # 12 words, 10 word 3-grams, 6 distinct: 4 repeat an earlier one
    assert repetition_ratio("the cat sat on the mat the cat sat on the mat") == pytest.approx(4 / 10)
    # case and punctuation do not make words different
    assert repetition_ratio("The cat sat on the mat. The cat, sat on the MAT!") == pytest.approx(4 / 10)
    assert repetition_ratio("a a a a a a a a a a") == pytest.approx(7 / 8)
    assert repetition_ratio("a b c d e f g h i j") == 0.0
    assert repetition_ratio("yes yes yes yes yes yes yes yes yes") == 0.0  # 9 words: too short to judge


def test_repetition_ratio_chinese_characters():
    # 14 characters, 12 character 3-grams, 7 distinct
    assert repetition_ratio("我爱北京天安门我爱北京天安门") == pytest.approx(5 / 12)
    assert repetition_ratio("我爱北京 天安门我爱北京天安门") == pytest.approx(5 / 12)  # spaces are not units
    assert repetition_ratio("我爱北京天安门") == 0.0


def test_symbol_ratio():
    assert symbol_ratio("Hi!!") == 0.5
    assert symbol_ratio("你好，世界！") == pytest.approx(2 / 6)  # Chinese punctuation counts as symbols
    assert symbol_ratio("@#$ ab") == pytest.approx(3 / 5)  # whitespace is not counted at all
    assert symbol_ratio("a1 b2") == 0.0
    assert symbol_ratio(" \n") == 0.0


def test_quality_reason_order_and_bounds():
    step = QualityFilterStep(step="filter_quality", max_repetition_ratio=0.4, max_symbol_ratio=0.5, min_answer_chars=2)
    repeated = "the cat sat on the mat the cat sat on the mat"  # repetition exactly 0.4: kept
    assert quality_reason(repeated, "ok", step) is None
    assert quality_reason("a a a a a a a a a a", "ok", step) == "repetition"
    assert quality_reason("Hi!!", "ok", step) is None  # symbols exactly 0.5: kept
    assert quality_reason("Hi!!!", "ok", step) == "symbols"
    assert quality_reason("a a a a a a a a a a !!!!!!!!!!!!", " ", step) == "repetition"  # first reason wins
    assert quality_reason("fine text", " x ", step) == "short_answer"  # surrounding whitespace not counted
    assert quality_reason("fine text", None, step) is None  # text records have no answer


def test_classifier_reason():
    step = ClassifierFilterStep(step="filter_classifier", function="mymod:score", min_score=0.5)
    assert classifier_reason(0.49, step) == "classifier_score"
    assert classifier_reason(0.5, step) is None
    assert classifier_reason(1, step) is None
    for bad in (1.5, -0.1, float("nan"), True, "0.7", None):
        with pytest.raises(DsftError, match=r"steps\[\]\.filter_classifier\.function \(mymod:score\)"):
            classifier_reason(bad, step)


# ---------------------------------------------------------------- fingerprints


def test_canonical_line():
    assert canonical_line({"b": 1, "a": "中 文", "c": {"z": [1, 2], "y": None}}) == (
        '{"a":"中 文","b":1,"c":{"y":null,"z":[1,2]}}'
    )


def test_fingerprint_stable_across_key_order_and_streaming():
    records = [{"instruction": "你好", "output": "hi"}, {"text": "x"}]
    reordered = [{"output": "hi", "instruction": "你好"}, {"text": "x"}]
    expected = hashlib.sha256('{"instruction":"你好","output":"hi"}\n{"text":"x"}\n'.encode()).hexdigest()
    assert fingerprint_records(records) == expected
    assert fingerprint_records(reordered) == expected
    streaming = Fingerprint()
    for record in records:
        streaming.update(record)
    assert (streaming.hexdigest(), streaming.count) == (expected, 2)
    changed = copy.deepcopy(records)
    changed[1]["text"] = "y"
    assert fingerprint_records(changed) != expected
    assert fingerprint_records(records[::-1]) != expected  # order of records matters
    assert fingerprint_records([]) == hashlib.sha256(b"").hexdigest()


def test_fingerprint_file(tmp_path):
    data_file = tmp_path / "train.jsonl"
    assert read_fingerprint(data_file) is None
    digest = "ab" * 32
    path = write_fingerprint(data_file, digest, 1400)
    assert path == tmp_path / "train.jsonl.sha256"
    assert path.read_text(encoding="utf-8") == (
        f"{digest}  train.jsonl\n# records: 1400, sha256 over canonical JSON lines (sorted keys, compact)\n"
    )
    assert read_fingerprint(data_file) == digest
    path.write_text("not a digest\n", encoding="utf-8")
    assert read_fingerprint(data_file) is None


# ---------------------------------------------------------------- report

def _report(balance=True) -> dict:
    return {
        "inputs": [{"path": "raw.jsonl", "records": 1000}],
        "format": "alpaca",
        "tokenizer": None,
        "records_in": 1000,
        "skipped_bad": 2,
        "skip_reasons": ["raw.jsonl:7: missing field 'output'", "raw.jsonl:9: not a JSON object"],
        "steps": [
            {"step": "clean", "in": 998, "out": 998, "removed": {}},
            {"step": "filter_quality", "in": 998, "out": 950, "removed": {"repetition": 40, "symbols": 8}},
            {"step": "dedup", "in": 950, "out": 900, "removed": {"exact": 30, "near": 20}},
            {"step": "pii", "in": 900, "out": 900, "removed": {}, "masked": {"email": 12, "phone": 3}},
        ],
        "duplicates": [{"removed": "raw.jsonl:40", "kept": "raw.jsonl:3", "kind": "near"}],
        "splits": {"train": 800, "validation": 45, "test": 45},
        "contamination": {"found": 3, "dropped": 3,
                          "examples": [{"split": "test", "source": "raw.jsonl:99", "kind": "ngram", "overlap": 0.4}]},
        "train_steps": [
            {"step": "balance", "in": 800, "out": 700, "removed": {"undersampled": 100}},
            {"step": "augment", "in": 700, "out": 1400, "added": 700},
        ],
        "balance": {"before": {"pos": 600, "neg": 200}, "after": {"pos": 500, "neg": 200}} if balance else None,
        "token_lengths": {"train": [12, 40, 3, 7, 100, 5, 9, 20, 30, 50], "validation": [10, 20], "test": []},
        "outputs": {
            "train": {"path": "train.jsonl", "records": 1400, "sha256": "0123456789abcdef" * 4},
            "validation": {"path": "validation.jsonl", "records": 45, "sha256": "f" * 64},
        },
        "seconds": 12.3,
        "records_per_second": 81.3,
    }


def test_length_stats_nearest_rank():
    # sorted: 3 5 7 9 12 20 30 40 50 100
    assert length_stats([12, 40, 3, 7, 100, 5, 9, 20, 30, 50]) == {
        "count": 10, "min": 3, "mean": 27.6, "p50": 12, "p95": 100, "max": 100}
    assert length_stats([4]) == {"count": 1, "min": 4, "mean": 4.0, "p50": 4, "p95": 4, "max": 4}
    assert length_stats([])["p95"] is None


def test_report_files_and_json(tmp_path):
    report = _report()
    original = copy.deepcopy(report)
    paths = write_prepare_report(report, tmp_path)
    assert [p.name for p in paths] == ["report.json", "token_lengths.png", "balance.png", "report.md"]
    assert report == original  # the caller's dict is not changed
    for png in ("token_lengths.png", "balance.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_SIGNATURE
    saved = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert saved["token_lengths"] == {
        "train": {"count": 10, "min": 3, "mean": 27.6, "p50": 12, "p95": 100, "max": 100},
        "validation": {"count": 2, "min": 10, "mean": 15.0, "p50": 10, "p95": 20, "max": 20},
        "test": {"count": 0, "min": None, "mean": None, "p50": None, "p95": None, "max": None},
    }
    assert {k: v for k, v in saved.items() if k != "token_lengths"} == {
        k: v for k, v in original.items() if k != "token_lengths"}


def test_report_markdown_rows(tmp_path):
    write_prepare_report(_report(), tmp_path)
    lines = (tmp_path / "report.md").read_text(encoding="utf-8").splitlines()
    expected_rows = [
        "| raw.jsonl | 1000 |",
        "- format: alpaca",
        "- lengths counted in: characters",
        "- records read: 1000, skipped as bad: 2",
        "  - raw.jsonl:7: missing field 'output'",
        "| step | in | out | removed | by reason |",
        "| clean | 998 | 998 | 0 | — |",
        "| filter_quality | 998 | 950 | 48 | repetition 40, symbols 8 |",
        "| dedup | 950 | 900 | 50 | exact 30, near 20 |",
        "| pii | 900 | 900 | 0 | — |",
        "| email | 12 |",
        "| phone | 3 |",
        "| raw.jsonl:40 | raw.jsonl:3 | near |",
        "| train | 800 |",
        "| validation | 45 |",
        "Validation and test records overlapping train: 3 found, 3 dropped.",
        "| test | raw.jsonl:99 | ngram | 0.400 |",
        "| balance | 800 | 700 | 100 | undersampled 100 |",
        "| augment | 700 | 1400 | 0 | added 700 |",
        "| pos | 600 | 500 |",
        "| neg | 200 | 200 |",
        "## Record length (characters)",
        "| train | 10 | 3 | 27.6 | 12 | 100 | 100 |",
        "| test | 0 | — | — | — | — | — |",
        f"| train | train.jsonl | 1400 | `{'0123456789abcdef' * 4}` |",
        "1000 records in 12.3 s (81.3 records/s).",
        "![token lengths](token_lengths.png)",
        "![balance](balance.png)",
    ]
    for row in expected_rows:
        assert row in lines, row
    assert lines[0] == "# Data preparation report"


def test_report_without_labels_or_tokenizer(tmp_path):
    report = _report(balance=False)
    report["tokenizer"] = "deepseek-ai/tiny"
    paths = write_prepare_report(report, tmp_path)
    assert [p.name for p in paths] == ["report.json", "token_lengths.png", "report.md"]
    assert not (tmp_path / "balance.png").exists()
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Class balance" not in markdown and "balance.png" not in markdown
    assert "- lengths counted in: tokens (tokenizer deepseek-ai/tiny)" in markdown.splitlines()
    assert "## Record length (tokens)" in markdown

