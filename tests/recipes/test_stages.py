"""Multi-stage runs end to end: each stage starts from the previous stage's weights."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from dsft.cli import app
from dsft.models.load import load_run

from .conftest import make_config
from .test_classify import labelled_data  # noqa: F401  (fixture)


def _write_stages(tmp_path, tiny_data, stages, **sections):
    path = make_config(tmp_path, tiny_data, **sections)
    import yaml

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["stages"] = stages
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def _train(path, *extra):
    result = CliRunner().invoke(app, ["train", str(path), *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_a_classifier_stage_starts_from_the_domain_stage_weights(tmp_path, tiny_data, labelled_data):  # noqa: F811
    stages = [
        {"name": "domain", "train": {"max_steps": 6}},
        {"name": "task", "task": "classification", "classify": {"head_only": True},
         "data": {"train_files": [str(labelled_data)], "validation_ratio": 0.25},
         "train": {"max_steps": 8, "learning_rate": 1e-2}},
    ]
    path = _write_stages(tmp_path, tiny_data, stages, model={"preset": "tiny-qwen2"}, method={"type": "full"})
    _train(path)
    run = tmp_path / "run"
    domain, task = run / "stages" / "1-domain", run / "stages" / "2-task"
    summary = json.loads((run / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["domain", "task"]
    assert summary["stages"][1]["started_from"] == str(domain.resolve())
    assert summary["stages"][0]["summary"]["steps"] == 6 and summary["stages"][1]["summary"]["steps"] == 8
    # head_only froze the backbone in stage 2, so its backbone is stage 1's result bit for bit.
    lm, classifier = load_file(domain / "model.safetensors"), load_file(task / "model.safetensors")
    backbone = {k: v for k, v in classifier.items() if k.startswith("model.")}
    assert backbone and all(torch.equal(v, lm[k]) for k, v in backbone.items())
    assert set(classifier) - set(backbone) == {"score.weight"}
    for stage in (domain, task):
        assert (stage / "metrics.jsonl").is_file() and (stage / "config.yaml").is_file()


def test_lora_stages_hand_over_merged_weights_and_resume_skips_finished_stages(tmp_path, tiny_data):
    stages = [{"name": "one", "train": {"max_steps": 4}}, {"name": "two", "train": {"max_steps": 4}}]
    path = _write_stages(tmp_path, tiny_data, stages, train={"save_steps": 2})
    _train(path)
    run = tmp_path / "run"
    one, two = run / "stages" / "1-one", run / "stages" / "2-two"
    adapter_base = json.loads((two / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert adapter_base == str((one / "merged").resolve())
    # The merged weights are stage one's base plus its adapter: same logits as the adapter run (this process, one CPU
    # path, the low-rank product summed into the weight or beside it: rtol 1e-5 holds on each path the suite checks).
    adapter_model, tokenizer, _ = load_run(one)
    merged = AutoModelForCausalLM.from_pretrained(one / "merged")
    ids = torch.tensor([tokenizer("3 km to m")["input_ids"]])
    with torch.no_grad():
        expected = adapter_model(input_ids=ids).logits
        actual = merged(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    before = (two / "summary.json").read_bytes()
    output = _train(path, "--resume")
    assert (two / "summary.json").read_bytes() == before  # nothing retrained
    assert "stage 2/2" in output
