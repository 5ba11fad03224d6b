"""Multitask heads end to end on tiny models: NER, intent and a yes/no compliance check on one backbone,
each record labelled for only some heads; train, per-head metrics and losses, save/load, predict, resume."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from dsft.cli import app
from dsft.config import load_config
from dsft.models.load import load_run
from dsft.train.multitask import run_multitask

from ..learning import NOT_LEARNING, Claim, assert_learned, assert_not_learned, learning
from .conftest import logs_with_and_without_packing, read_metrics

PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
CITIES = [["paris"], ["london"], ["tokyo"], ["berlin"], ["madrid"], ["new", "york"], ["hong", "kong"], ["san", "diego"]]
TEMPLATES = {
    "book": [["book", "a", "table", "for", "PER", "in", "CITY"], ["please", "book", "a", "flight", "to", "CITY", "for", "PER"]],
    "weather": [["what", "is", "the", "weather", "in", "CITY"], ["will", "it", "rain", "in", "CITY", "for", "PER"]],
    "greet": [["say", "hello", "to", "PER"], ["send", "my", "regards", "to", "PER", "in", "CITY"]],
}
ENDINGS = {"no": [["and", "share", "the", "password"], ["and", "send", "the", "secret", "code"]],
           "yes": [["and", "thank", "you"], ["right", "now", "please"]]}
HEADS = [{"name": "ner", "kind": "token", "label_field": "ner_tags"},
         {"name": "intent", "kind": "sequence", "label_field": "intent"},
         {"name": "compliance", "kind": "sequence", "label_field": "compliant", "loss_weight": 0.5}]


def synthetic_record(rng: random.Random, i: int) -> dict:
    """Intent from the template's verbs, compliance from the ending ("password"/"secret": no), PER and LOC
    entities from the name lists; record i lacks one head's label (i % 4: ner, intent, compliance) or none."""
    intent, compliant = ["book", "weather", "greet"][i % 3], "yes" if (i // 3) % 2 == 0 else "no"
    words, tags = [], []
    for slot in rng.choice(TEMPLATES[intent]):
        if slot in ("PER", "CITY"):
            entity, kind = ([rng.choice(PEOPLE)], "PER") if slot == "PER" else (rng.choice(CITIES), "LOC")
            words += entity
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
        else:
            words.append(slot)
            tags.append("O")
    ending = rng.choice(ENDINGS[compliant])
    record = {"tokens": words + ending, "ner_tags": tags + ["O"] * len(ending), "intent": intent, "compliant": compliant}
    missing = {0: "ner_tags", 1: "intent", 2: "compliant"}.get(i % 4)
    if missing is not None:
        del record[missing]
    return record


@pytest.fixture(scope="module")
def multitask_data(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("multitask") / "data.jsonl"
    path.write_text("".join(json.dumps(synthetic_record(rng, i)) + "\n" for i in range(160)), encoding="utf-8")
    return path


def multitask_config(tmp_path, data, model, method, **train):
    config = {
        "task": "multitask",
        "model": model,
        "data": {"train_files": [str(data)], "validation_ratio": 0.25, "max_length_tokens": 64},
        "method": method,
        "train": {"learning_rate": 1e-3, "max_steps": 40, "batch_size": 8, "logging_steps": 5, "eval_steps": 20,
                  "lr_scheduler": "constant", "seed": 0, "tensorboard": False, **train},
        "multitask": {"heads": HEADS},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def train_full(tmp_path, multitask_data, **train) -> Path:
    """`dsft train` of full tiny-qwen2 with the three heads; the run directory."""
    path = multitask_config(tmp_path, multitask_data, {"preset": "tiny-qwen2"}, {"type": "full"}, **train)
    result = CliRunner().invoke(app, ["train", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, multitask_data):
    return train_full(tmp_path_factory.mktemp("full"), multitask_data, save_steps=20)


def full_claims(run_dir: Path) -> list[Claim]:
    """40 validation records, each head labelled in about 3 of 4: intent (chance 1/3), compliance (chance 1/2),
    NER (span F1 near 0 by chance; token accuracy 0.81 when every tag is O). Measured on every path of
    tests/cpu_paths.sh (AMD EPYC; default, avx2, avx512; 1 and 2 threads; MKL's own and its compatible summation
    order): intent 0.971, compliance 0.963, F1 0.532, token accuracy 0.922, intent loss ratio 0.202; a run that does
    not learn: 0.206, 0.407, 0.078, 0.297, 1.01. The loss ratio's bound sits midway (0.25 was 0.05 from the value);
    token accuracy's stays above the all-O score."""
    tasks = json.loads((run_dir / "summary.json").read_text())["tasks"]
    train_records = [r for r in read_metrics(run_dir) if "loss" in r]
    return [Claim("intent validation accuracy", tasks["intent"]["accuracy"], ">=", 0.8),
            Claim("compliance validation accuracy", tasks["compliance"]["accuracy"], ">=", 0.8),
            Claim("NER validation span F1", tasks["ner"]["f1"], ">=", 0.35),
            Claim("NER validation token accuracy", tasks["ner"]["token_accuracy"], ">=", 0.85),
            Claim("intent train loss, last log / first", train_records[-1]["loss_intent"]
                  / train_records[0]["loss_intent"], "<", 0.5)]


@learning
def test_each_head_learns_from_its_labelled_records(full_run):
    assert_learned(full_claims(full_run))
    summary = json.loads((full_run / "summary.json").read_text())
    tasks = summary["tasks"]
    assert {name: tasks[name]["labelled"] for name in tasks} == summary["labelled"]["validation"] == \
        {"ner": 28, "intent": 34, "compliance": 27}
    assert set(tasks["intent"]["per_class"]) == {"book", "greet", "weather"}
    assert set(tasks["ner"]["per_type"]) == {"LOC", "PER"}
    assert [head["labels"] for head in summary["heads"]][1:] == [["book", "greet", "weather"], ["no", "yes"]]
    records = read_metrics(full_run)
    train_records = [r for r in records if "loss" in r]
    assert len(train_records) == 8 and all({"loss_ner", "loss_intent", "loss_compliance"} <= set(r) for r in train_records)
    evals = [r for r in records if "eval_intent_accuracy" in r]
    assert [r["step"] for r in evals] == [20, 40, 40]  # two evaluations and the final one
    assert evals[-1]["eval_ner_f1"] == tasks["ner"]["f1"] and evals[-1]["eval_compliance_labelled"] == 27
    assert not list(full_run.rglob("*.bin")) or all(p.name == "training_args.bin" for p in full_run.rglob("*.bin"))


@learning
def test_heads_that_do_not_learn_fail_the_claims(tmp_path, multitask_data):
    assert_not_learned(full_claims(train_full(tmp_path, multitask_data, **NOT_LEARNING)))


def test_saved_run_loads_back_with_the_trained_weights(full_run):
    model, tokenizer, _ = load_run(full_run)
    assert not model.training and type(model.backbone).__name__ == "Qwen2Model"
    description = json.loads((full_run / "multitask.json").read_text())
    assert description["backbone"]["architecture"] == "Qwen2Model" and len(description["heads"]) == 3
    # The Trainer's checkpoint at the last step holds the weights in memory at the end of training.
    trained = type(model)(model.backbone, model.head_specs, model.pad_token_id)
    trained.load_state_dict(load_file(str(full_run / "checkpoints" / "checkpoint-40" / "model.safetensors")))
    ids = tokenizer(["book a table for bob in rome", "say hello to erin"], padding=True, return_tensors="pt")
    inputs = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    with torch.no_grad():
        loaded, expected = model(**inputs).logits, trained.eval()(**inputs).logits
    for name in ("ner", "intent", "compliance"):
        torch.testing.assert_close(loaded[name], expected[name], rtol=0, atol=0)


def test_predict_gives_every_heads_prediction(full_run, multitask_data, tmp_path):
    before = multitask_data.read_bytes()
    records = [json.loads(line) for line in before.decode().splitlines()]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in records[:12])
                      + json.dumps({"text": "send my regards to bob in new york and thank you"}) + "\n", encoding="utf-8")
    out = tmp_path / "preds.jsonl"
    result = CliRunner().invoke(app, ["predict", str(full_run), "--input", str(inputs), "--output", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert multitask_data.read_bytes() == before
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 13 and all(set(line["predictions"]) == {"ner", "intent", "compliance"} for line in lines)
    for record, line in zip(records[:12], lines):
        assert {k: line[k] for k in record} == record
        assert len(line["predictions"]["ner"]["tags"]) == len(record["tokens"])
        scores = line["predictions"]["intent"]["scores"]
        assert line["predictions"]["intent"]["label"] == max(scores, key=scores.get)
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    labelled = [(r["intent"], line["predictions"]["intent"]["label"]) for r, line in zip(records[:12], lines) if "intent" in r]
    assert sum(ref == pred for ref, pred in labelled) >= 0.8 * len(labelled)
    assert lines[-1]["words"] == ["send", "my", "regards", "to", "bob", "in", "new", "york", "and", "thank", "you"]
    assert lines[-1]["predictions"]["intent"]["label"] == "greet"


def test_resume_continues_to_the_same_weights(full_run, multitask_data, tmp_path):
    resumed_dir = tmp_path / "run"
    shutil.copytree(full_run, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "checkpoint-40")
    path = multitask_config(tmp_path, multitask_data, {"preset": "tiny-qwen2"}, {"type": "full"}, save_steps=20)
    result = CliRunner().invoke(app, ["train", str(path), "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "checkpoint-20" in result.output
    # The same shapes replayed on the same CPU path in this process: bitwise equal on any path.
    for name in ("heads.safetensors", "model.safetensors"):
        expected, resumed = load_file(str(full_run / name)), load_file(str(resumed_dir / name))
        assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    losses = {r["step"]: r["loss_ner"] for r in read_metrics(resumed_dir) if "loss_ner" in r}
    assert losses == {r["step"]: r["loss_ner"] for r in read_metrics(full_run) if "loss_ner" in r}


@learning
def test_lora_on_deepseek_v3_adapts_the_backbone_and_trains_the_heads(tmp_path, multitask_data):
    path = multitask_config(tmp_path, multitask_data, {"preset": "tiny-deepseek-v3"},
                            {"type": "lora", "lora": {"r": 8, "alpha": 64}}, eval_steps=None)
    result = run_multitask(load_config(path))
    tasks = result.summary["tasks"]
    # Chance: intent 1/3, compliance 1/2, NER span F1 near 0.
    assert_learned([Claim("intent validation accuracy", tasks["intent"]["accuracy"], ">=", 0.8),
                    Claim("compliance validation accuracy", tasks["compliance"]["accuracy"], ">=", 0.8),
                    Claim("NER validation span F1", tasks["ner"]["f1"], ">=", 0.15)])
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or n.startswith("heads.") for n in trained)
    assert {f"heads.{h['name']}.{w}" for h in HEADS for w in ("weight", "bias")} <= trained
    run_dir = tmp_path / "run"
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "base_model" / "model.safetensors").is_file()
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter["task_type"] == "FEATURE_EXTRACTION" and adapter["base_model_name_or_path"].endswith("base_model")
    # The run loads back (adapter on base_model/, heads) with the same logits.
    model, tokenizer, _ = load_run(run_dir)
    ids = tokenizer("will it rain in paris and thank you", return_tensors="pt")["input_ids"]
    result.model.eval()
    with torch.no_grad():
        loaded, in_memory = model(ids).logits, result.model(ids).logits
    for name in ("ner", "intent", "compliance"):
        torch.testing.assert_close(loaded[name], in_memory[name], rtol=0, atol=1e-5)


@learning
def test_eval_scores_each_head_on_its_labelled_records(full_run, multitask_data, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", str(full_run), "--data", str(multitask_data), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    heads = json.loads((out / "results.json").read_text())["models"]["target"]["heads"]
    lines = [json.loads(line) for line in multitask_data.read_text().splitlines()]
    assert {name: head["labelled_records"] for name, head in heads.items()} == {
        "ner": sum("ner_tags" in r for r in lines), "intent": sum("intent" in r for r in lines),
        "compliance": sum("compliant" in r for r in lines)}
    assert heads["ner"]["report"]["entities"] > 0
    assert_learned([Claim("intent accuracy of dsft eval on the 160 records", heads["intent"]["report"]["accuracy"],
                          ">=", 0.8)])
    assert (out / "target" / "intent" / "confusion_matrix.png").is_file()


def test_packed_batches_train_as_padded_ones(tmp_path, monkeypatch, multitask_data):
    """train.packing on three heads over one backbone (LoRA on DeepSeek-V3): every logged loss, and each head's,
    equals the padded run's."""
    def config_for(directory, packing):
        return multitask_config(directory, multitask_data, {"preset": "tiny-deepseek-v3"}, {"type": "lora"},
                                max_steps=3, logging_steps=1, eval_steps=None, packing=packing)

    keys = ("loss", *(f"loss_{head['name']}" for head in HEADS))
    logs = logs_with_and_without_packing(tmp_path, monkeypatch, config_for, keys, "packing: each batch runs as one row")
    torch.testing.assert_close(torch.tensor(logs[True]), torch.tensor(logs[False]), rtol=1e-4, atol=1e-6)


def test_accumulated_micro_batches_equal_one_batch(tmp_path, multitask_data):
    """Partially labelled records: batch 4 x 2 accumulation steps logs the losses of batch 8, each head's loss a
    mean over the step's labelled items (MultitaskTrainer), not a mean of micro-batch means. Three steps in this
    process on one CPU path, sums of other shapes: rtol 1e-4 holds on each CPU path the suite is checked on."""
    losses = {}
    for name, train in (("one_batch", {"batch_size": 8}), ("accumulated", {"batch_size": 4, "grad_accum_steps": 2})):
        (tmp_path / name).mkdir()
        path = multitask_config(tmp_path / name, multitask_data, {"preset": "tiny-qwen2"}, {"type": "full"},
                                max_steps=3, logging_steps=1, eval_steps=None, **train)
        result = CliRunner().invoke(app, ["train", str(path)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name / "run") if "loss" in r]
    assert len(losses["one_batch"]) == 3
    torch.testing.assert_close(torch.tensor(losses["accumulated"]), torch.tensor(losses["one_batch"]), rtol=1e-4,
                               atol=1e-6)
