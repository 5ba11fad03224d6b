"""Classification end to end on tiny models: full and LoRA learn, labels are saved, dsft predict agrees."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from dsft.cli import app
from dsft.config import load_config
from dsft.errors import DsftError
from dsft.models.load import load_run
from dsft.train.classify import run_classify

from ..learning import NOT_LEARNING, Claim, assert_learned, assert_not_learned, learning
from .conftest import QUICKSTART, logs_with_and_without_packing, make_config

KEYWORDS = {"km": "distance", "kg": "weight", "yuan": "money"}


@pytest.fixture(scope="module")
def labelled_data(tmp_path_factory):
    """96 quickstart prompts labelled by unit keyword (32 per label, interleaved)."""
    groups = {label: [] for label in KEYWORDS.values()}
    for line in (QUICKSTART / "train.jsonl").read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["instruction"]
        for keyword, label in KEYWORDS.items():
            if re.search(rf"\b{keyword}\b", text) and len(groups[label]) < 32:
                groups[label].append({"text": text, "label": label})
                break
    records = [record for trio in zip(*groups.values()) for record in trio]
    path = tmp_path_factory.mktemp("labelled") / "labelled.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def classify_config(tmp_path, data, **sections):
    base = {"data": {"train_files": [str(data)], "validation_ratio": 0.25, "max_length_tokens": 64},
            "train": {"learning_rate": 1e-3, "max_steps": 30, "batch_size": 8, "logging_steps": 5, "lr_scheduler": "constant"}}
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values} if section in ("train", "data") else values
    path = make_config(tmp_path, {"train": data}, **base)
    path.write_text("task: classification\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    return path


FULL_QWEN = {"model": {"preset": "tiny-qwen2"}, "method": {"type": "full"}}


def train_full(tmp_path, labelled_data, **train) -> dict:
    """`dsft train` of a full tiny-qwen2 classifier; its summary.json."""
    path = classify_config(tmp_path, labelled_data, **FULL_QWEN, train=train)
    result = CliRunner().invoke(app, ["train", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, labelled_data):
    tmp_path = tmp_path_factory.mktemp("full")
    train_full(tmp_path, labelled_data)
    return tmp_path / "run"


def classify_claims(summary: dict) -> list[Claim]:
    # Chance is 1/3. On every path of tests/cpu_paths.sh: 1.0 (full, FGM and LoRA); a run that does not learn: 0.417.
    return [Claim("validation accuracy", summary["accuracy"], ">=", 0.8)]


@learning
def test_full_classifier_learns_and_saves_its_labels(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    assert_learned(classify_claims(summary))
    assert summary["steps"] == 30
    assert summary["labels"] == ["distance", "money", "weight"]
    assert set(summary["classification"]["per_class"]) == {"distance", "money", "weight"}
    model_config = json.loads((full_run / "config.json").read_text())
    assert model_config["id2label"] == {"0": "distance", "1": "money", "2": "weight"}
    assert model_config["architectures"] == ["Qwen2ForSequenceClassification"]
    assert not list(full_run.glob("*.bin"))
    eval_records = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in line]
    assert eval_records and eval_records[-1]["eval_accuracy"] == summary["accuracy"]
    analysis = full_run / "eval" / "step-30"
    assert (analysis / "confusion_matrix.png").is_file() and (analysis / "worst_confusions.json").is_file()
    assert "| reference \\ prediction | distance | money | weight |" in (analysis / "confusion_matrix.md").read_text()
    assert summary["worst_confusions"] == json.loads((analysis / "worst_confusions.json").read_text())


@learning
def test_full_classifier_that_does_not_learn_fails_the_claims(tmp_path, labelled_data):
    assert_not_learned(classify_claims(train_full(tmp_path, labelled_data, **NOT_LEARNING)))


@learning
def test_predict_writes_the_argmax_of_the_model(full_run, labelled_data, tmp_path):
    before = labelled_data.read_bytes()
    out = tmp_path / "preds.jsonl"
    result = CliRunner().invoke(app, ["predict", str(full_run), "--input", str(labelled_data), "--output", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert labelled_data.read_bytes() == before
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    inputs = [json.loads(line) for line in before.decode().splitlines()]
    assert len(lines) == len(inputs) == 96
    model, tokenizer, config = load_run(full_run)
    for record, line in zip(inputs[:6], lines[:6]):
        assert {k: line[k] for k in record} == record
        ids = tokenizer(record["text"], add_special_tokens=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model.config.id2label[int(model(input_ids=ids).logits.argmax(-1))]
        assert line["prediction"] == expected == max(line["scores"], key=line["scores"].get)
        assert sum(line["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    accuracy = sum(line["prediction"] == line["label"] for line in lines) / len(lines)
    assert_learned([Claim("accuracy of dsft predict on all 96 records", accuracy, ">=", 0.8)])


def test_predict_names_the_record_without_text(full_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "Convert 3 km to m."}\n{"body": "x"}\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["predict", str(full_run), "--input", str(bad), "--output", str(tmp_path / "o.jsonl")])
    assert result.exit_code != 0
    assert f"{bad}:2" in str(result.exception) and "'text'" in str(result.exception)
    assert not (tmp_path / "o.jsonl").exists()


@learning
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_on_deepseek_v3_learns(tmp_path, labelled_data, method):
    """LoRA, and QLoRA on a 4-bit NF4 base whose new score head stays unquantized (it trains in full)."""
    path = classify_config(tmp_path, labelled_data, model={"preset": "tiny-deepseek-v3"},
                           method={"type": method, "lora": {"r": 8, "alpha": 64}})
    result = run_classify(load_config(path))
    assert_learned(classify_claims(result.summary))
    if method == "qlora":
        assert result.summary["quantization"]["quantized_parameters"] > 0
        head = result.model.get_base_model().score
        assert all(type(p).__name__ == "Parameter" for p in head.parameters())
    assert result.summary["trainable_parameters"] < result.summary["total_parameters"]
    run_dir = tmp_path / "run"
    assert (run_dir / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "config.json").read_text())["id2label"]["2"] == "weight"
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any(".score." in n for n in trained) and any("lora_" in n for n in trained)
    # The run loads back (adapter on base_model/) with the same logits.
    model, tokenizer, _ = load_run(run_dir)
    ids = tokenizer("Convert 3 kg to g.", add_special_tokens=True, return_tensors="pt")["input_ids"]
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_head_only_trains_only_the_score_head(tmp_path, labelled_data):
    path = classify_config(tmp_path, labelled_data, model={"preset": "tiny-qwen2"}, method={"type": "full"},
                           classify={"head_only": True}, train={"max_steps": 1})
    result = run_classify(load_config(path))
    assert {n for n, p in result.model.named_parameters() if p.requires_grad} == {"score.weight"}


@learning
def test_eval_scores_a_classifier_run_with_error_analysis(full_run, labelled_data, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", str(full_run), "--data", str(labelled_data), "--against", str(full_run),
                                      "--out", str(out), "--set", "eval.bootstrap_resamples=50"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    target, against = results["models"]["target"], results["models"]["against"]
    assert results["task"] == "classification" and results["data"]["records"] == 96
    assert target["headline"] == against["headline"]
    assert_learned([Claim("accuracy of dsft eval on all 96 records", target["headline"]["accuracy"], ">=", 0.8)])
    low, high = target["intervals"]["accuracy"]
    assert low <= target["headline"]["accuracy"] <= high
    assert sum(map(sum, target["classification"]["confusion_matrix"])) == 96
    assert target["speed"]["records_per_s"] > 0
    assert (out / "target" / "confusion_matrix.png").is_file() and "Confusion matrix" in (out / "report.md").read_text()


def test_eval_of_a_classifier_names_a_record_without_label(full_run, tmp_path):
    data = tmp_path / "unlabelled.jsonl"
    data.write_text('{"text": "3 km", "label": "distance"}\n{"text": "5 kg"}\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", str(full_run), "--data", str(data)])
    assert isinstance(result.exception, DsftError) and f"{data}:2: field 'label' is missing" in str(result.exception)


def test_packed_batches_train_as_padded_ones(tmp_path, monkeypatch, labelled_data):
    """train.packing on a classifier (LoRA on DeepSeek-V3's MoE): each padded batch runs as one row of its real tokens,
    and every logged loss equals the padded run's (tests/unit/test_packed_forward.py checks one pass's gradients)."""
    def config_for(directory, packing):
        return classify_config(directory, labelled_data, train={"max_steps": 3, "logging_steps": 1, "packing": packing})

    logs = logs_with_and_without_packing(tmp_path, monkeypatch, config_for, ("loss",), "packing: each batch runs as one row")
    torch.testing.assert_close(torch.tensor(logs[True]), torch.tensor(logs[False]), rtol=1e-4, atol=1e-6)
