"""GRPO end to end on a tiny model: the reward rises, every metric reaches metrics.jsonl, TRL's advantages equal
dsft's group formula, prompts are dsft's ids, LoRA's reference is the adapter-disabled model."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dsft.cli import app
from dsft.config import load_config
from dsft.data.formats import Message
from dsft.errors import DsftError
from dsft.models.load import load_run
from dsft.models.generate import prompt_ids
from dsft.train.grpo import run_grpo
from dsft.train.rl_math import group_advantages

from ..learning import NOT_LEARNING, Claim, assert_learned, assert_not_learned, learning
from .conftest import logs_with_and_without_packing, read_metrics
from .rl_start import LOW_FIRST_DIGIT, one_thread, prompts_file, rl_config, sft_start  # noqa: F401 (autouse)

GRPO = {"group_size": 8, "sampling": {"max_new_tokens": 4}, "kl_coef": 0.04, "rewards": [LOW_FIRST_DIGIT]}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    run_dir = sft_start(tmp_path_factory)
    return run_dir, prompts_file(run_dir.parent)


def train_full(tmp_path, start, **train) -> Path:
    """`dsft train` of GRPO on full tiny-qwen2 from the SFT start; the run directory."""
    path = rl_config(tmp_path, *start, "grpo", grpo=GRPO, train=train)
    result = CliRunner().invoke(app, ["train", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, start):
    return train_full(tmp_path_factory.mktemp("grpo-full"), start)


def grpo_claims(run_dir: Path) -> list[Claim]:
    """The mean reward (over the first and the last 3 steps) rises, and the policy leaves its reference."""
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [r for r in read_metrics(run_dir) if "reward" in r]
    assert summary["reward_first"] <= 0.7  # about half the SFT start's answers begin with 1-4
    # Measured on every path of tests/cpu_paths.sh (AMD EPYC; default, avx2, avx512; 1 and 2 threads; MKL's own and
    # its compatible summation order): reward 0.917, gain 0.406, KL 1.275-1.276; a run that does not learn: 0.375,
    # -0.052, KL 0. The reward's bound sits above what the SFT start scores (at most 0.7) and 0.17 under the value.
    return [Claim("mean reward, last 3 steps", summary["reward_last"], ">=", 0.75),
            Claim("mean reward, last 3 steps - first 3", summary["reward_last"] - summary["reward_first"], ">=", 0.25),
            Claim("KL to the reference, last step", records[-1]["kl"], ">", 1e-3)]


@learning
def test_grpo_raises_the_mean_reward(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["stage"] == "grpo" and summary["steps"] == 16 and summary["loss_type"] == "grpo"
    assert_learned(grpo_claims(full_run))


@learning
def test_grpo_that_does_not_learn_fails_the_claims(tmp_path, start):
    assert_not_learned(grpo_claims(train_full(tmp_path, start, **NOT_LEARNING)))


def test_each_step_logs_reward_spread_components_kl_entropy_and_clipping(full_run):
    records = [r for r in read_metrics(full_run) if "reward" in r]
    assert [r["step"] for r in records] == list(range(1, 17))
    for key in ("loss", "reward", "reward_std", "reward_low_first_digit", "reward_low_first_digit_std", "kl",
                "entropy", "clip_fraction", "completion_length_tokens"):
        assert all(math.isfinite(r[key]) for r in records), key
    # The first batch is sampled from the reference itself: its KL is 0 up to the rounding of two forward passes
    # (exactly 0.0 on one machine's kernels; a tolerance holds on every CPU path).
    assert abs(records[0]["kl"]) < 1e-6
    assert not any(key.startswith("rewards/") for key in records[0])  # TRL's names became dsft's


def test_grpo_run_directory_loads_and_answers(full_run):
    model, tokenizer, config = load_run(full_run)
    assert config.stage == "grpo" and config.data.chat_template in ("deepseek_v3", "tokenizer")
    ids = prompt_ids([Message("user", "Convert 12 km to m.")], config.data.chat_template, tokenizer)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert torch.isfinite(logits).all()


def test_trl_advantages_equal_the_group_formula_and_prompts_are_dsfts_ids(tmp_path, start):
    """A LoRA run in process: TRL's logged advantages of its last batch equal group_advantages of the logged
    rewards; the trainer generates from dsft's prompt ids; the reference is the adapter-disabled model."""
    path = rl_config(tmp_path, *start, "grpo", grpo={**GRPO, "scale_rewards": "group"},
                     method={"type": "lora", "lora": {"r": 8, "alpha": 16}}, train={"max_steps": 3})
    result = run_grpo(load_config(path))
    trainer = result.trainer
    rewards = torch.tensor(list(trainer._logs["rewards"]["low_first_digit"]))
    advantages = torch.tensor(list(trainer._logs["advantages"]))
    assert advantages.tolist() == pytest.approx(group_advantages(rewards, 8, "group").tolist(), abs=1e-5)
    # Prompts: the ids GRPOTrainer generates from are those of `dsft generate`.
    config = load_config(result.run_dir / "config.yaml")
    messages = [Message("user", json.loads(line)["instruction"])
                for line in start[1].read_text(encoding="utf-8").splitlines()[:3]]
    texts = list(trainer.prompt_ids)[:3]
    ids, _, _ = trainer._tokenize_prompts(texts)
    assert ids == [prompt_ids([m], config.data.chat_template, result.tokenizer) for m in messages]
    assert list(result.model.peft_config) == ["default"]  # TRL's "ref" adapter copy was removed
    assert (result.run_dir / "adapter_model.safetensors").is_file() and not (result.run_dir / "ref").exists()


def test_a_batch_of_partial_groups_is_refused(tmp_path, start):
    path = rl_config(tmp_path, *start, "grpo", grpo=GRPO, train={"batch_size": 12})
    with pytest.raises(DsftError, match=r"train.batch_size x train.grad_accum_steps \(12\).*multiple of grpo.group_size \(8\)"):
        run_grpo(load_config(path))


def test_packed_batches_train_as_padded_ones(tmp_path, monkeypatch, start):
    """train.packing: the log-probability (and value) passes run each batch of prompts and completions as one row of
    real tokens, and every logged loss, reward and KL equals the padded run's over the first steps."""
    def config_for(directory, packing):
        return rl_config(directory, *start, "grpo", grpo=GRPO, train={"max_steps": 3, "packing": packing})

    logs = logs_with_and_without_packing(tmp_path, monkeypatch, config_for, ("loss", "reward", "kl"), "packing:")
    torch.testing.assert_close(torch.tensor(logs[True]), torch.tensor(logs[False]), rtol=1e-3, atol=1e-5)


def test_qlora_grpo_trains_an_adapter_on_a_4bit_base(tmp_path, start):
    """method.type qlora through TRL's GRPOTrainer: the reference is the adapter-disabled 4-bit base; the run
    directory holds the adapter, its base and the record of what was quantized."""
    path = rl_config(tmp_path, *start, "grpo", grpo=GRPO, method={"type": "qlora", "lora": {"r": 8, "alpha": 16}},
                     train={"max_steps": 2})
    result = CliRunner().invoke(app, ["train", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["quantization"]["quantized_parameters"] > 0
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "quantization.json").is_file()
