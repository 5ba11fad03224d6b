"""Reward models end to end on tiny models: the pairwise accuracy rises above chance on a planted preference,
the run directory loads as a reward function whose scores order the validation pairs as training measured,
and a LoRA reward model on DeepSeek-V3 loads the same way."""

import json

import pytest
import torch
from typer.testing import CliRunner

from dsft.cli import app
from dsft.data.dataset import DataStats
from dsft.data.preference_data import load_pairs
from dsft.models.reward import load_reward_model

from ..learning import NOT_LEARNING, Claim, assert_learned, assert_not_learned, learning
from .conftest import QUICKSTART, logs_with_and_without_packing, make_config, read_metrics

POLITE, RUDE = "happy to help.", "stop asking."


def planted_pairs(count: int) -> list[dict]:
    """Messages-style pairs on quickstart prompts: the same answer, said politely (chosen) or rudely (rejected)."""
    records = [json.loads(line) for line in (QUICKSTART / "train.jsonl").read_text(encoding="utf-8").splitlines()[:count]]
    user = [{"role": "user", "content": r["instruction"]} for r in records]
    return [{"prompt": [turn], "chosen": [{"role": "assistant", "content": f"{r['output']}, {POLITE}"}],
             "rejected": [{"role": "assistant", "content": f"{r['output']}, {RUDE}"}]} for turn, r in zip(user, records)]


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("preferences")
    pairs = planted_pairs(128)
    files = {"train": root / "train.jsonl", "validation": root / "validation.jsonl"}
    for name, chunk in (("train", pairs[:96]), ("validation", pairs[96:])):
        files[name].write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in chunk), encoding="utf-8")
    return files


def reward_config(tmp_path, files, **sections):
    base = {"data": {"train_files": [str(files["train"])], "validation_files": [str(files["validation"])],
                     "max_length_tokens": 48},
            "train": {"learning_rate": 1e-3, "max_steps": 24, "batch_size": 8, "logging_steps": 4, "eval_steps": 12,
                      "lr_scheduler": "constant"}}
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values} if section in ("train", "data") else values
    path = make_config(tmp_path, {"train": files["train"]}, **base)
    path.write_text("stage: reward\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    return path


def train_full(tmp_path, preference_files, **train) -> dict:
    """`dsft train` of a full tiny-qwen2 reward model; its summary.json."""
    path = reward_config(tmp_path, preference_files, model={"preset": "tiny-qwen2"}, method={"type": "full"},
                         train=train)
    result = CliRunner().invoke(app, ["train", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, preference_files):
    tmp_path = tmp_path_factory.mktemp("full")
    train_full(tmp_path, preference_files)
    return tmp_path / "run"


def reward_claims(summary: dict) -> list[Claim]:
    # Chance is 0.5; the random head of tiny-qwen2 prefers the rude ending (accuracy 0 before training). On every
    # path of tests/cpu_paths.sh: accuracy 1.0 and margin 7.40; a run that does not learn: 0.0 and -0.048 (so a
    # margin bound of 0 would sit inside a random head's spread).
    return [Claim("validation pairwise accuracy", summary["pairwise_accuracy"], ">=", 0.9),
            Claim("validation reward margin (chosen - rejected)", summary["eval_margin"], ">", 1.0)]


@learning
def test_reward_model_learns_the_planted_preference(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    assert_learned(reward_claims(summary))
    assert summary["steps"] == 24 and summary["pairwise_accuracy_before"] is not None
    evaluations = [r for r in read_metrics(full_run) if "eval_pairwise_accuracy" in r]
    assert [r["step"] for r in evaluations][:3] == [0, 12, 24]  # before training, then every eval_steps
    assert evaluations[-1]["eval_pairwise_accuracy"] == summary["pairwise_accuracy"]
    train_logs = [r for r in read_metrics(full_run) if "loss" in r]
    assert {"accuracy", "margin", "mean_reward"} <= set(train_logs[-1])
    model_config = json.loads((full_run / "config.json").read_text())
    assert model_config["architectures"] == ["Qwen2ForSequenceClassification"] and model_config["id2label"] == {"0": "reward"}


@learning
def test_reward_model_that_does_not_learn_fails_the_claims(tmp_path, preference_files):
    assert_not_learned(reward_claims(train_full(tmp_path, preference_files, **NOT_LEARNING)))


def test_reward_function_orders_validation_pairs_as_training_measured(full_run, preference_files):
    reward = load_reward_model(full_run, device="cpu")
    pairs = load_pairs([str(preference_files["validation"])], "error", DataStats())
    prompts = [pair.prompt for pair in pairs]
    chosen = reward(prompts, [pair.chosen.content for pair in pairs])
    rejected = reward(prompts, [pair.rejected.content for pair in pairs])
    summary = json.loads((full_run / "summary.json").read_text())
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
    assert accuracy == summary["pairwise_accuracy"]
    # Prompts given as ids rendered by the reward model itself score the same as messages (up to padding width).
    by_ids = reward([reward.prompt_ids(p) for p in prompts[:4]], [pair.chosen.content for pair in pairs[:4]])
    assert by_ids == pytest.approx(chosen[:4], abs=1e-5)
    # Plain transformers loads the run directory: the same score for the same ids.
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(full_run)
    ids = torch.tensor([reward.sequence_ids(prompts[0], pairs[0].chosen.content)])
    assert plain(input_ids=ids).logits[0, 0].item() == pytest.approx(chosen[0], abs=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward(prompts[:2], ["x"])


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_reward_model_on_deepseek_v3_loads_as_a_reward_function(tmp_path, preference_files, method):
    path = reward_config(tmp_path, preference_files, train={"max_steps": 4, "eval_steps": 4},
                         data={"validation_files": []}, method={"type": method, "lora": {"r": 8, "alpha": 64}})
    result = CliRunner().invoke(app, ["train", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    assert (run_dir / "adapter_config.json").is_file() and (run_dir / "base_model").is_dir()
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    reward = load_reward_model(run_dir, device="cpu")
    scores = reward([[pair.prompt[0]] for pair in load_pairs([str(preference_files["train"])], "error", DataStats(), max_samples=3)],
                    ["1", "2", "3"])
    assert len(scores) == 3 and all(isinstance(score, float) for score in scores)


def test_packed_batches_train_as_padded_ones(tmp_path, monkeypatch, preference_files):
    """train.packing on a reward model: each batch of chosen and rejected answers runs as one row of real tokens,
    and every logged loss and accuracy equals the padded run's."""
    def config_for(directory, packing):
        return reward_config(directory, preference_files, model={"preset": "tiny-qwen2"}, method={"type": "full"},
                             train={"max_steps": 3, "logging_steps": 1, "eval_steps": None, "packing": packing})

    logs = logs_with_and_without_packing(tmp_path, monkeypatch, config_for, ("loss", "accuracy"), "packing: each batch runs")
    torch.testing.assert_close(torch.tensor(logs[True]), torch.tensor(logs[False]), rtol=1e-4, atol=1e-6)
