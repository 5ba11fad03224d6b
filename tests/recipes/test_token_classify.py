"""Token classification (NER, BIO tags) end to end on tiny models: full Qwen2 on English and LoRA DeepSeek-V3
on Chinese learn a planted task, tags are saved as id2label, dsft predict agrees with the model's argmax,
and a record whose tags do not fit its words stops `dsft train` with file:line and no traceback."""

import json
import random
import sys

import pytest
import torch
from typer.testing import CliRunner

from dsft.cli import app, main
from dsft.config import load_config
from dsft.data.bio import encode_words, word_predictions
from dsft.models.load import load_run
from dsft.train.token_classify import run_token_classify

from ..learning import NOT_LEARNING, Claim, assert_learned, assert_not_learned, learning
from .conftest import logs_with_and_without_packing, make_config

# Planted task: names from a fixed list are PER, cities LOC; every other word is O. A word's first token
# and the words before it decide its tag, which is what a causal backbone can see.
FIRST_NAMES = ["Alice", "Bruno", "Carmen", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi"]
SURNAMES = ["Smith", "Novak", "Okafor", "Larsen"]
CITIES = [["Paris"], ["Tokyo"], ["Lagos"], ["Oslo"], ["Lima"], ["Cairo"], ["New", "York"], ["Hong", "Kong"]]
TEMPLATES_EN = ["{P} lives in {L} .", "yesterday {P} flew to {L} with {P} .", "{L} is where {P} works .",
                "we met {P} in {L} last year .", "the train from {L} to {L} was late ."]
NAMES_ZH = ["张伟", "李娜", "王芳", "刘洋", "陈静"]
CITIES_ZH = ["北京", "上海", "广州", "深圳", "成都", "杭州"]
TEMPLATES_ZH = ["{P}在{L}工作", "{P}明天去{L}", "昨天{P}和{P}到了{L}", "{L}的{P}很好", "我们从{L}去{L}"]


def _entity(kind: str, words: list[str]) -> tuple[list[str], list[str]]:
    return words, [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)


def _sentence(template: str, rng: random.Random, chinese: bool) -> dict:
    """Fill a template's {P} and {L} slots; returns {"tokens", "tags"} (Chinese: one word per character)."""
    words, tags = [], []
    for piece in template.replace("{", "|{").replace("}", "}|").split("|"):
        if piece == "{P}":
            name = list(rng.choice(NAMES_ZH)) if chinese else [rng.choice(FIRST_NAMES)] + rng.choice([[], [rng.choice(SURNAMES)]])
            chunk = _entity("PER", name)
        elif piece == "{L}":
            chunk = _entity("LOC", list(rng.choice(CITIES_ZH)) if chinese else rng.choice(CITIES))
        else:
            plain = list(piece) if chinese else piece.split()
            chunk = (plain, ["O"] * len(plain))
        words += chunk[0]
        tags += chunk[1]
    return {"tokens": words, "tags": tags}


def write_ner_data(path, count: int, chinese: bool, seed: int = 0):
    rng = random.Random(seed)
    templates = TEMPLATES_ZH if chinese else TEMPLATES_EN
    records = [_sentence(templates[i % len(templates)], rng, chinese) for i in range(count)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def english_data(tmp_path_factory):
    return write_ner_data(tmp_path_factory.mktemp("ner") / "english.jsonl", 160, chinese=False)


@pytest.fixture(scope="module")
def chinese_data(tmp_path_factory):
    return write_ner_data(tmp_path_factory.mktemp("ner") / "chinese.jsonl", 160, chinese=True)


def ner_config(tmp_path, data, separator: str, **sections):
    base = {"data": {"train_files": [str(data)], "validation_ratio": 0.25, "max_length_tokens": 64},
            "train": {"learning_rate": 1e-3, "max_steps": 40, "batch_size": 8, "logging_steps": 5,
                      "lr_scheduler": "constant", "eval_steps": 20},
            "token_classify": {"word_separator": separator}}
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values} if section in ("train", "data") else values
    path = make_config(tmp_path, {"train": data}, **base)
    path.write_text("task: token_classification\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    return path


def train_full(tmp_path, english_data, **train) -> dict:
    """`dsft train` of a full tiny-qwen2 tagger on the English data; its summary.json."""
    path = ner_config(tmp_path, english_data, "space", model={"preset": "tiny-qwen2"}, method={"type": "full"},
                      train=train)
    result = CliRunner().invoke(app, ["train", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, english_data):
    tmp_path = tmp_path_factory.mktemp("full")
    train_full(tmp_path, english_data)
    return tmp_path / "run"


def ner_claims(summary: dict, f1_bound: float) -> list[Claim]:
    # Chance is near 0 span F1. On every path of tests/cpu_paths.sh: English 1.0, Chinese (LoRA) 0.984; a run that
    # does not learn: 0.077.
    return [Claim("validation span F1", summary["f1"], ">=", f1_bound)]


@learning
def test_full_english_ner_learns_and_saves_its_tags(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    assert_learned(ner_claims(summary, 0.9))
    assert summary["steps"] == 40
    assert summary["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert set(summary["ner"]["per_type"]) == {"LOC", "PER"}
    model_config = json.loads((full_run / "config.json").read_text())
    assert model_config["id2label"] == {"0": "O", "1": "B-LOC", "2": "I-LOC", "3": "B-PER", "4": "I-PER"}
    assert model_config["architectures"] == ["Qwen2ForTokenClassification"]
    report = json.loads((full_run / "ner_report.json").read_text())
    assert report["f1"] == summary["f1"] and report["per_type"]["PER"]["support"] > 0
    assert "| PER |" in (full_run / "ner_report.md").read_text()
    evals = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines() if "eval_f1" in line]
    assert len(evals) >= 2 and evals[-1]["eval_f1"] == summary["f1"]


@learning
def test_full_tagger_that_does_not_learn_fails_the_claims(tmp_path, english_data):
    assert_not_learned(ner_claims(train_full(tmp_path, english_data, **NOT_LEARNING), 0.9))


def test_predict_writes_the_argmax_of_the_model(full_run, english_data, tmp_path):
    inputs = [json.loads(line) for line in english_data.read_text(encoding="utf-8").splitlines()[:12]]
    records = [*inputs, {"text": "Greta Larsen lives in Hong Kong ."}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "preds.jsonl"
    result = CliRunner().invoke(app, ["predict", str(full_run), "--input", str(source), "--output", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == len(records)
    model, tokenizer, _ = load_run(full_run)
    tags = [model.config.id2label[i] for i in range(model.config.num_labels)]
    for record, line in zip(records, lines):
        words = record["tokens"] if "tokens" in record else record["text"].split()
        input_ids, word_ids = encode_words(words, tokenizer, "space")
        with torch.no_grad():
            predicted_T = model(input_ids=torch.tensor([input_ids])).logits[0].argmax(-1).tolist()
        assert line["tags"] == [tags[i] for i in word_predictions(word_ids, predicted_T, len(words))]
        assert "truncated_words" not in line
    assert lines[-1]["words"] == ["Greta", "Larsen", "lives", "in", "Hong", "Kong", "."]
    assert lines[-1]["entities"] == [{"type": "PER", "start_word": 0, "end_word": 2, "text": "Greta Larsen"},
                                     {"type": "LOC", "start_word": 4, "end_word": 6, "text": "Hong Kong"}]
    assert sum(line["tags"] == record["tags"] for record, line in zip(inputs, lines)) >= 10


def test_predict_marks_words_cut_off_by_truncation(full_run, tmp_path):
    source = tmp_path / "long.jsonl"
    words = ["Alice", "lives", "in", "Paris", "."] * 20
    source.write_text(json.dumps({"tokens": words}) + "\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    result = CliRunner().invoke(app, ["predict", str(full_run), "--input", str(source), "--output", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    line = json.loads(out.read_text())
    cut_off = line["truncated_words"]
    assert 0 < cut_off < len(words) and line["tags"][-cut_off:] == ["O"] * cut_off and len(line["tags"]) == 100


def test_predict_rejects_a_tag_not_seen_in_training(full_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": ["Alice", "works"], "tags": ["B-PER", "O"]}\n'
                   '{"tokens": ["Acme", "works"], "tags": ["B-ORG", "O"]}\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["predict", str(full_run), "--input", str(bad), "--output", str(tmp_path / "o.jsonl")])
    assert result.exit_code != 0
    assert f"{bad}:2" in str(result.exception) and "'B-ORG'" in str(result.exception)
    assert not (tmp_path / "o.jsonl").exists()


@learning
def test_lora_on_deepseek_v3_learns_chinese_ner(tmp_path, chinese_data):
    path = ner_config(tmp_path, chinese_data, "none", model={"preset": "tiny-deepseek-v3"},
                      method={"type": "lora", "lora": {"r": 8, "alpha": 16}},
                      train={"eval_steps": None, "learning_rate": 2e-3})
    result = run_token_classify(load_config(path))
    print("LoRA tiny-deepseek-v3 Chinese:", {k: result.summary[k] for k in ("f1", "macro_f1", "token_accuracy", "wall_time_s")})
    # Measured 0.984 after 40 steps (0.944 and 0.977 with seeds 1 and 2; alpha 64 at learning rate 1e-3 gave 0.90,
    # at 3e-3 0.36: the tiny MoE backbone is easily shaken by large LoRA steps).
    assert_learned(ner_claims(result.summary, 0.9))
    run_dir = tmp_path / "run"
    assert (run_dir / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "config.json").read_text())["id2label"]["3"] == "B-PER"
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any(".score." in n for n in trained) and any("lora_" in n for n in trained)
    # The run loads back (adapter on base_model/) with its tags and the same logits.
    model, tokenizer, _ = load_run(run_dir)
    assert model.config.id2label == dict(enumerate(result.tags))
    input_ids, _ = encode_words(list("张伟在上海工作"), tokenizer, "none")
    result.model.eval()
    with torch.no_grad():
        ids = torch.tensor([input_ids])
        torch.testing.assert_close(model(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_bio_mismatch_stops_train_with_file_and_line(tmp_path, english_data, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = english_data.read_text(encoding="utf-8").splitlines()[:4]
    bad.write_text("\n".join([*lines, '{"tokens": ["Alice", "lives", "here"], "tags": ["B-PER", "O"]}']) + "\n",
                   encoding="utf-8")
    path = ner_config(tmp_path, bad, "space", model={"preset": "tiny-qwen2"}, method={"type": "full"})
    monkeypatch.setattr(sys, "argv", ["dsft", "train", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"{bad}:5" in err and "'tags'" in err and "2 tags for 3 words" in err and "Traceback" not in err


def test_packed_batches_train_as_padded_ones(tmp_path, monkeypatch, chinese_data):
    """train.packing on a token tagger (LoRA on DeepSeek-V3): every logged loss equals the padded run's."""
    def config_for(directory, packing):
        return ner_config(directory, chinese_data, "none",
                          train={"max_steps": 3, "logging_steps": 1, "eval_steps": None, "packing": packing})

    logs = logs_with_and_without_packing(tmp_path, monkeypatch, config_for, ("loss",), "packing: each batch runs as one row")
    torch.testing.assert_close(torch.tensor(logs[True]), torch.tensor(logs[False]), rtol=1e-4, atol=1e-6)
