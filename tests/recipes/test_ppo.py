"""PPO end to end on a tiny model: finite losses, the value loss falls, the mean reward rises; on a fixed rollout
the losses are those rl_math computes; LoRA's reference is the adapter-disabled model; accumulated micro-batches
equal one larger batch; a run resumed from a checkpoint (save_steps or SIGTERM) logs what the uninterrupted one did."""

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dsft.cli import app
from dsft.config import load_config
from dsft.data.dataset import DataStats
from dsft.data.prompts import load_rl_prompts
from dsft.errors import TrainingInterrupted
from dsft.models.load import load_run
from dsft.models.value_head import VALUE_HEAD_FILE
from dsft.train import rl_math
from dsft.train.callbacks import MetricsCallback
from dsft.train.ppo import collect_rollout, ppo_losses, run_ppo
from dsft.train.rewards import build_rewards

from ..learning import NOT_LEARNING, Claim, assert_learned, assert_not_learned, learning, mean
from .conftest import logs_with_and_without_packing, read_metrics
from .rl_start import LOW_FIRST_DIGIT, one_thread, prompts_file, rl_config, sft_start  # noqa: F401 (autouse)

PPO = {"rollout_batch_size": 32, "sampling": {"max_new_tokens": 4}, "kl_coef": 0.05, "ppo_epochs": 2,
       "rewards": [LOW_FIRST_DIGIT]}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    run_dir = sft_start(tmp_path_factory)
    return run_dir, prompts_file(run_dir.parent)


def train_full(tmp_path, start, **train) -> Path:
    """`dsft train` of PPO on full tiny-qwen2 from the SFT start; the run directory."""
    path = rl_config(tmp_path, *start, "ppo", ppo=PPO, train={"learning_rate": 3e-4, "batch_size": 16, **train})
    result = CliRunner().invoke(app, ["train", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, start):
    return train_full(tmp_path_factory.mktemp("ppo-full"), start)


def ppo_claims(run_dir: Path) -> list[Claim]:
    """The mean reward rises, the value head learns the returns, the policy leaves its reference."""
    summary, records = json.loads((run_dir / "summary.json").read_text()), read_metrics(run_dir)
    assert summary["reward_first"] <= 0.7  # about half the SFT start's answers begin with 1-4
    # The first rollout comes from the reference: its KL is 0 up to the rounding of two forward passes of different
    # batch shapes (6e-8 on AVX-512, -3e-8 on the default path; exactly 0.0 on some machines).
    assert abs(records[0]["kl"]) < 1e-6
    value_losses = [r["value_loss"] for r in records]
    # Measured on every path of tests/cpu_paths.sh (AMD EPYC; default, avx2, avx512; 1 and 2 threads; MKL's own and
    # its compatible summation order): reward 0.9375, value loss ratio 0.144, KL 0.68-0.70; a run that does not
    # learn: 0.396, 0.821, |KL| under 2e-8. The reward's bound sits above the SFT start's score, 0.19 under the value.
    return [Claim("mean reward, last 3 steps", summary["reward_last"], ">=", 0.75),
            Claim("value loss, mean of the last 3 steps / the first 3", mean(value_losses[-3:]) / mean(value_losses[:3]),
                  "<", 0.5),
            Claim("KL to the reference, last step", records[-1]["kl"], ">", 1e-3)]


@learning
def test_ppo_raises_the_reward_and_lowers_the_value_loss(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    records = read_metrics(full_run)
    assert summary["stage"] == "ppo" and summary["steps"] == 16 and len(records) == 16
    for key in ("loss", "policy_loss", "value_loss", "reward", "reward_std", "reward_low_first_digit", "kl",
                "entropy", "clip_fraction", "value_clip_fraction", "approx_kl", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert_learned(ppo_claims(full_run))


@learning
def test_ppo_that_does_not_learn_fails_the_claims(tmp_path, start):
    assert_not_learned(ppo_claims(train_full(tmp_path, start, **NOT_LEARNING)))


def test_ppo_run_directory_holds_the_policy_and_its_value_head(full_run):
    assert (full_run / VALUE_HEAD_FILE).is_file()
    model, _, config = load_run(full_run)
    assert config.stage == "ppo"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_losses_on_a_fixed_rollout_are_rl_maths(tmp_path, start):
    """A LoRA policy: its first rollout has KL 0 to the adapter-disabled reference; on that rollout the policy
    ratio is 1, so the clipped loss is -mean(A) with nothing clipped, and the value loss is 0.5 mean((V - R)^2)."""
    path = rl_config(tmp_path, *start, "ppo", ppo=PPO, method={"type": "lora", "lora": {"r": 8, "alpha": 16}},
                     train={"max_steps": 2, "batch_size": 16})
    config = load_config(path)
    result = run_ppo(config)
    assert list(result.model.peft_config) == ["default"]
    records = read_metrics(result.run_dir)
    assert abs(records[0]["kl"]) < 1e-6 and all(math.isfinite(r["loss"]) for r in records)  # 0 up to rounding

    config = load_config(result.run_dir / "config.yaml")
    torch.manual_seed(0)
    prompts = load_rl_prompts(config.data, result.tokenizer, config.data.chat_template, DataStats())[:8]
    components = build_rewards(config.ppo.rewards, "ppo.rewards", config.ppo.sampling.max_new_tokens)
    rollout = collect_rollout(result.model, None, result.value_head, result.tokenizer, prompts, components, config)
    losses = ppo_losses(result.model, result.value_head, rollout, list(range(8)), config)
    mask = rollout.completion_mask_BT
    assert losses["policy_loss"].item() == pytest.approx(-rl_math.masked_mean(rollout.advantages_BT, mask).item(), abs=1e-5)
    assert losses["clip_fraction"] == 0.0 and losses["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    expected_value_loss = 0.5 * rl_math.masked_mean((rollout.values_BT - rollout.returns_BT) ** 2, mask).item()
    assert losses["value_loss"].item() == pytest.approx(expected_value_loss, rel=1e-5)
    expected = (losses["policy_loss"] + config.ppo.value_loss_coef * losses["value_loss"]
                - config.ppo.entropy_coef * losses["entropy"])
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_accumulating_micro_batches_equals_one_larger_batch(tmp_path, start):
    """Minibatches of 16 rows, at once or as 2 x 8 accumulated: the same losses and gradient norm (one step, this
    process and CPU path, sums of other shapes: rel 1e-4, which holds on each CPU path the suite is checked on)."""
    records = {}
    for batch_size, accumulation in ((16, 1), (8, 2)):
        (tmp_path / str(batch_size)).mkdir()
        path = rl_config(tmp_path / str(batch_size), *start, "ppo", ppo=PPO,
                         train={"max_steps": 1, "batch_size": batch_size, "grad_accum_steps": accumulation})
        records[batch_size] = read_metrics(run_ppo(load_config(path)).run_dir)[0]
    for key in ("loss", "policy_loss", "value_loss", "entropy", "grad_norm", "reward"):
        assert records[8][key] == pytest.approx(records[16][key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("method", [{"type": "full"}, {"type": "lora", "lora": {"r": 8, "alpha": 16}},
                                    {"type": "qlora", "lora": {"r": 8, "alpha": 16}}], ids=["full", "lora", "qlora"])
def test_resume_from_a_checkpoint_continues_the_uninterrupted_run(tmp_path, start, method):
    """4 steps with a checkpoint every 2; a copy without a sound checkpoint-4 resumed (the real CLI) logs steps 3 and 4
    as the uninterrupted run did: same sampled tokens (rewards), losses and learning rates."""
    sections = {"ppo": {**PPO, "rollout_batch_size": 8}, "method": method,
                "train": {"max_steps": 4, "batch_size": 4, "save_steps": 2, "lr_scheduler": "linear"}}
    (tmp_path / "first").mkdir()
    (tmp_path / "resumed").mkdir()
    first = CliRunner().invoke(app, ["train", str(rl_config(tmp_path / "first", *start, "ppo", **sections))],
                               catch_exceptions=False)
    assert first.exit_code == 0, first.output
    run_dir = tmp_path / "first" / "run"
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    adapter = method["type"] in ("lora", "qlora")
    weights = "adapter_model.safetensors" if adapter else "model.safetensors"
    assert {p.name for p in checkpoint.iterdir()} >= {weights, VALUE_HEAD_FILE, "manifest.json", "optimizer.pt",
                                                      "rng_state.pt", "trainer_state.json"}
    assert not list(checkpoint.glob("*.bin")) and not list(checkpoint.glob("*.pkl"))

    resumed_dir = tmp_path / "resumed" / "run"
    shutil.copytree(run_dir, resumed_dir)
    newest = resumed_dir / "checkpoints" / "checkpoint-4"
    if adapter:
        shutil.rmtree(newest)
    else:  # a torn checkpoint-4 (optimizer.pt cut short) is skipped, with the reason
        (newest / "optimizer.pt").write_bytes((newest / "optimizer.pt").read_bytes()[:100])
    path = rl_config(tmp_path / "resumed", *start, "ppo", **sections)
    resumed = CliRunner().invoke(app, ["train", str(path), "--resume"], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert adapter or "skipping" in resumed.output
    assert "resuming from" in resumed.output and "checkpoint-2" in resumed.output

    # The resumed steps replay the same shapes on the same CPU path in this process: rel 1e-5 holds on any path.
    expected, got = read_metrics(run_dir), read_metrics(resumed_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4]  # no duplicate lines for the steps after the checkpoint
    for want, have in zip(expected, got):
        for key, value in want.items():
            if key not in ("time", "step_time_s"):
                assert have[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (want["step"], key)
    summary = json.loads((resumed_dir / "summary.json").read_text())
    assert summary["steps"] == 4


def test_sigterm_saves_a_checkpoint_that_resumes_the_same_run(tmp_path, start, monkeypatch):
    """SIGTERM during step 2 (no save_steps): the step finishes, checkpoint-2 is written, the run stops with the
    resume command; --resume then logs steps 3 and 4 as the uninterrupted run did."""
    sections = {"ppo": {**PPO, "rollout_batch_size": 8}, "train": {"max_steps": 4, "batch_size": 4}}
    for name in ("first", "stopped"):
        (tmp_path / name).mkdir()
    first = CliRunner().invoke(app, ["train", str(rl_config(tmp_path / "first", *start, "ppo", **sections))])
    assert first.exit_code == 0, first.output
    path = rl_config(tmp_path / "stopped", *start, "ppo", **sections)
    original_write = MetricsCallback.write

    def write_then_signal(self, record):
        original_write(self, record)
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 2 still runs (before its checkpoint check)

    monkeypatch.setattr(MetricsCallback, "write", write_then_signal)
    stopped = CliRunner().invoke(app, ["train", str(path)])
    message = str(stopped.exception)
    assert isinstance(stopped.exception, TrainingInterrupted), stopped.output
    assert "stopped by SIGTERM at step 2" in message and message.endswith("--resume")
    monkeypatch.setattr(MetricsCallback, "write", original_write)
    resumed = CliRunner().invoke(app, ["train", str(path), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    expected, got = read_metrics(tmp_path / "first" / "run"), read_metrics(tmp_path / "stopped" / "run")
    assert [r["step"] for r in got] == [1, 2, 3, 4]  # same shapes, same path: rel 1e-5 holds on any path
    for want, have in zip(expected[2:], got[2:]):
        for key in ("loss", "reward", "value_loss", "kl", "learning_rate"):
            assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (want["step"], key)


def test_packed_batches_train_as_padded_ones(tmp_path, monkeypatch, start):
    """train.packing: the log-probability (and value) passes run each batch of prompts and completions as one row of
    real tokens, and every logged loss, reward and KL equals the padded run's over the first steps."""
    def config_for(directory, packing):
        return rl_config(directory, *start, "ppo", ppo=PPO, train={"max_steps": 3, "packing": packing})

    logs = logs_with_and_without_packing(tmp_path, monkeypatch, config_for, ("loss", "value_loss", "reward", "kl"), "packing:")
    torch.testing.assert_close(torch.tensor(logs[True]), torch.tensor(logs[False]), rtol=1e-3, atol=1e-5)
