"""dsft data prepare end to end: steps, privacy, versioning, streaming equivalence, bad input."""

import json
import random
from pathlib import Path

import pytest
import yaml

from dsft.config import load_config, load_yaml_model
from dsft.data.fingerprint import read_fingerprint
from dsft.data.prepare import run_prepare
from dsft.data.prepare_config import PrepareConfig
from dsft.errors import DsftError
from dsft.train.sft import run_sft

from .conftest import make_config
from .test_sft import dsft_process

WORDS = ("parcel courier invoice refund warranty voucher ticket delay customs address label tariff carrier depot "
         "pallet receipt coupon bundle return exchange rebate balance statement deposit").split()
PII_VALUES = ["alice@example.com", "13800138000", "u3", "11010519491231002X"]
RAW = [
    {"instruction": "<p>Hello&amp;welcome, what is the refund policy?</p>", "output": "Refunds within 30 days.", "label": "billing", "user": "u1"},
    {"instruction": "hello&welcome, what is the refund policy?", "output": "Refunds within 30 days.", "label": "billing", "user": "u2"},
    {"instruction": "My email is alice@example.com, call 13800138000", "output": "We will contact you.", "label": "contact", "user": "u3"},
    {"instruction": "!!!!!!!! $$$$ #### @@@@", "output": "?", "label": "spam", "user": "u4"},
    {"instruction": "请问退款政策是什么？身份证 11010519491231002X", "output": "三十天内可以退款。", "label": "billing", "user": "u5"},
    {"instruction": "How do I reset my password?", "output": "Use the reset link on the login page.", "label": "account", "user": "u6"},
    {"instruction": "How do I change my password?", "output": "Use the settings page.", "label": "account", "user": "u7"},
    {"instruction": "Where is my order?", "output": "Check the tracking page.", "label": "shipping", "user": "u8"},
] + [{"instruction": " ".join(random.Random(i).sample(WORDS, 8)) + "?", "output": " ".join(random.Random(-i).sample(WORDS, 5)),
      "label": "shipping" if i % 3 else "billing", "user": f"g{i % 7}"} for i in range(40)]


def write_raw(tmp_path: Path, rows=RAW) -> Path:
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def prepare_config(tmp_path: Path, raw: Path, out: str = "out", **extra) -> Path:
    config = {
        "inputs": [str(raw)], "label_field": "label", "output_dir": str(tmp_path / out),
        "steps": [{"step": "clean", "strip_html": True}, {"step": "filter_quality", "max_symbol_ratio": 0.5},
                  {"step": "pii", "id_fields": ["user"], "salt": "${DSFT_TEST_SALT:-test-salt}"}, {"step": "dedup"}],
        "split": {"validation_ratio": 0.15, "test_ratio": 0.15, "group_field": "user", "seed": 1},
        "train_steps": [{"step": "balance", "max_ratio": 2.0}, {"step": "augment", "swap_count": 1, "delete_prob": 0.0}],
        **extra,
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def outputs(out: Path) -> dict[str, list[dict]]:
    return {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
            for name in ("train", "validation", "test")}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("prepare")
    raw = write_raw(tmp_path)
    original = raw.read_bytes()
    process = dsft_process("data", "prepare", prepare_config(tmp_path, raw))
    assert process.returncode == 0, process.stderr
    assert raw.read_bytes() == original, "input files are never modified"
    return tmp_path / "out", json.loads((tmp_path / "out" / "report.json").read_text()), process


def test_each_step_is_counted_and_the_outputs_add_up(prepared):
    out, report, _ = prepared
    steps = {entry["step"]: entry for entry in report["steps"]}
    assert report["records_in"] == len(RAW) and report["skipped_bad"] == 0
    assert steps["filter_quality"]["removed"] == {"symbols": 1}
    assert steps["dedup"]["removed"] == {"exact": 1}
    duplicates = [json.loads(line) for line in (out / "duplicates.jsonl").read_text().splitlines()]
    assert duplicates == [{"removed": f"{report['inputs'][0]['path']}:2", "kept": f"{report['inputs'][0]['path']}:1",
                           "kind": "exact"}]
    assert steps["pii"]["masked"] == {"email": 1, "phone": 1, "cn_id": 1, "user_id": 47}
    splits = outputs(out)
    originals = [r for r in splits["train"] if not r.get("augmented")]
    assert len(originals) + len(splits["validation"]) + len(splits["test"]) == report["train_steps"][0]["out"] + \
        report["splits"]["validation"] + report["splits"]["test"]
    assert not any(r.get("augmented") for name in ("validation", "test") for r in splits[name])
    counts = report["balance"]["after"]
    assert max(counts.values()) <= 2 * 2 * min(counts.values())  # balanced to 1:2, then every record augmented once


def test_no_personal_data_survives_in_outputs_or_report(prepared):
    out, _, process = prepared
    everything = process.stdout + process.stderr + "".join(
        p.read_text(encoding="utf-8") for p in out.iterdir() if p.suffix in (".jsonl", ".json", ".md", ".sha256"))
    for value in PII_VALUES:
        assert value not in everything
    assert "[EMAIL]" in (out / "train.jsonl").read_text() + (out / "validation.jsonl").read_text() + \
        (out / "test.jsonl").read_text()


def test_groups_never_cross_splits(prepared):
    splits = outputs(prepared[0])
    users = {name: {r["user"] for r in rows} for name, rows in splits.items()}
    assert not users["train"] & users["validation"] and not users["train"] & users["test"]
    assert not users["validation"] & users["test"]


def test_fingerprints_are_written_stable_and_sensitive(prepared, tmp_path):
    out, report, _ = prepared
    for name in ("train", "validation", "test"):
        assert read_fingerprint(out / f"{name}.jsonl") == report["outputs"][name]["sha256"]
    raw = write_raw(tmp_path)
    again = run_prepare(load_yaml_model(prepare_config(tmp_path, raw, "again"), PrepareConfig))
    assert {n: o["sha256"] for n, o in again["outputs"].items()} == {n: o["sha256"] for n, o in report["outputs"].items()}
    changed_rows = [dict(RAW[0], output="Refunds within 31 days."), *RAW[1:]]
    changed = run_prepare(load_yaml_model(prepare_config(tmp_path, write_raw(tmp_path, changed_rows), "changed"), PrepareConfig))
    assert changed["outputs"]["train"]["sha256"] != report["outputs"]["train"]["sha256"] or \
        changed["outputs"]["test"]["sha256"] != report["outputs"]["test"]["sha256"] or \
        changed["outputs"]["validation"]["sha256"] != report["outputs"]["validation"]["sha256"]


def test_streaming_in_small_chunks_in_two_processes_equals_one_pass(tmp_path):
    raw = write_raw(tmp_path)
    small = run_prepare(load_yaml_model(prepare_config(tmp_path, raw, "small", chunk_records=3, num_proc=2), PrepareConfig))
    whole = run_prepare(load_yaml_model(prepare_config(tmp_path, raw, "whole", chunk_records=100_000), PrepareConfig))
    assert {n: o["sha256"] for n, o in small["outputs"].items()} == {n: o["sha256"] for n, o in whole["outputs"].items()}
    assert small["steps"] == whole["steps"]


def test_report_files(prepared):
    out, _, _ = prepared
    assert {"report.md", "report.json", "token_lengths.png", "balance.png"} <= {p.name for p in out.iterdir()}


def test_malformed_record_names_file_and_line(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps(RAW[0]) + "\n{broken\n" + json.dumps({"instruction": "no output"}) + "\n", encoding="utf-8")
    process = dsft_process("data", "prepare", prepare_config(tmp_path, raw))
    assert process.returncode == 2 and f"{raw}:2" in process.stderr and "Traceback" not in process.stderr
    report = run_prepare(load_yaml_model(prepare_config(tmp_path, raw, "skip", on_error="skip"), PrepareConfig))
    assert report["skipped_bad"] == 2 and report["records_in"] == 3


def test_unknown_step_and_bad_threshold_are_config_errors(tmp_path):
    raw = write_raw(tmp_path)
    path = prepare_config(tmp_path, raw)
    config = yaml.safe_load(path.read_text())
    config["steps"] = [{"step": "dedupe"}, {"step": "dedup", "threshold": 1.5}]
    path.write_text(yaml.safe_dump(config))
    process = dsft_process("data", "prepare", path)
    assert process.returncode == 2 and "steps.0" in process.stderr and "'dedup'" in process.stderr
    assert "steps.1.dedup.threshold" in process.stderr and "Traceback" not in process.stderr


def test_the_run_summary_names_the_fingerprint_of_its_data(prepared, tmp_path, tiny_data):
    out = prepared[0]
    config = make_config(tmp_path, tiny_data, data={"train_files": [str(out / "train.jsonl")]}, train={"max_steps": 1})
    summary = run_sft(load_config(config)).summary
    assert summary["data_fingerprints"] == {str(out / "train.jsonl"): read_fingerprint(out / "train.jsonl")}


def test_long_text_records_are_chunked_with_overlap(tmp_path):
    raw = tmp_path / "docs.jsonl"
    text = " ".join(f"w{i}" for i in range(100))
    raw.write_text(json.dumps({"text": text, "doc": "a"}) + "\n" + json.dumps({"text": "short one", "doc": "b"}) + "\n",
                   encoding="utf-8")
    config = {"inputs": [str(raw)], "output_dir": str(tmp_path / "out"), "steps": [{"step": "chunk", "max_tokens": 120,
              "stride_tokens": 100}], "split": {"validation_ratio": 0.0, "test_ratio": 0.0}}
    path = tmp_path / "chunk.yaml"
    path.write_text(yaml.safe_dump(config))
    report = run_prepare(load_yaml_model(path, PrepareConfig))
    rows = outputs(tmp_path / "out")["train"]
    chunks = [r for r in rows if r["doc"] == "a"]
    assert report["steps"][0] == {"step": "chunk", "in": 2, "out": len(rows), "removed": {}}
    assert len(chunks) > 1 and all(len(c["text"]) <= 120 for c in chunks)  # characters: no tokenizer configured
    assert chunks[0]["text"] == text[:120] and chunks[1]["text"].startswith(text[100:110])
    assert [c["chunk"] for c in chunks] == list(range(len(chunks)))


def test_an_output_that_would_replace_an_input_is_refused(tmp_path):
    raw = write_raw(tmp_path)
    train = raw.rename(tmp_path / "train.jsonl")
    before = train.read_bytes()
    config = yaml.safe_load(prepare_config(tmp_path, train, "unused").read_text(encoding="utf-8"))
    config["output_dir"] = str(tmp_path)
    with pytest.raises(DsftError, match="would write over the input"):
        run_prepare(PrepareConfig.model_validate(config))
    assert train.read_bytes() == before


def test_inputs_with_their_own_field_names_prepare_into_the_same_records(prepared, tmp_path):
    renamed = [{"question" if key == "instruction" else "reply" if key == "output" else key: value
                for key, value in row.items()} for row in RAW]
    raw = write_raw(tmp_path, renamed)
    config = prepare_config(tmp_path, raw, columns={"instruction": "question", "output": "reply"})
    report = run_prepare(load_yaml_model(config, PrepareConfig))
    assert report["records_in"] == len(RAW) and report["format"] == "alpaca"
    assert outputs(tmp_path / "out") == outputs(prepared[0])  # written in dsft's field names
