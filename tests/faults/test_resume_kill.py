"""Exact resume: a run SIGKILLed after its step-10 checkpoint and resumed equals a straight run, bitwise (full
fine-tuning, a QLoRA adapter on a 4-bit base, and a LoRA adapter whose gates carry DeepSeek-V3's correction bias).
On tiny-deepseek-v3, full fine-tuning updates that bias after every step (method.moe.bias_update auto): the resumed
run gets it back from the checkpoint, or its routing and every later weight would differ."""

import signal
import subprocess

import pytest
import torch

from .conftest import (
    dsft_command,
    ledger,
    make_config,
    per_step,
    run_dsft,
    wait_for,
    weights,
)

STEPS = 20


def config_for(tmp_path, tiny_data, name, method=None):
    # 64 samples in batches of 4 is 16 steps an epoch: the 20 steps cross an epoch boundary,
    # where the data order is reshuffled, so resume must restore that too.
    return make_config(
        tmp_path / name,
        tiny_data,
        method=method or {"type": "full"},
        train={"max_steps": STEPS, "batch_size": 4, "save_steps": 10, "learning_rate": 1e-3},
        output={"dir": str(tmp_path / name / "run")},
    )


BIASED_LORA = {"type": "lora", "lora": {"r": 8, "alpha": 16}, "moe": {"bias_update": "on", "bias_update_speed": 0.01}}


@pytest.mark.parametrize("method", [None, {"type": "qlora", "lora": {"r": 8, "alpha": 16}}, BIASED_LORA],
                         ids=["full", "qlora", "lora-bias"])
def test_sigkill_and_resume_reproduces_the_straight_run_bitwise(tmp_path, tiny_data, method):
    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    straight_config = config_for(tmp_path, tiny_data, "straight", method)
    killed_config = config_for(tmp_path, tiny_data, "killed", method)
    straight = run_dsft("train", straight_config)
    assert straight.returncode == 0, straight.stderr
    straight_dir, killed_dir = tmp_path / "straight" / "run", tmp_path / "killed" / "run"

    process = subprocess.Popen(dsft_command("train", killed_config), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # The checkpoint directory appears only once complete (atomic rename); kill right after it.
    wait_for(lambda: (killed_dir / "checkpoints" / "checkpoint-10").is_dir() or process.poll() is not None, what="checkpoint-10")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed_dir / "summary.json").exists()

    resumed = run_dsft("train", killed_config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "checkpoint-10" in resumed.stdout

    assert per_step(killed_dir, "loss") == per_step(straight_dir, "loss")
    assert per_step(killed_dir, "learning_rate") == per_step(straight_dir, "learning_rate")
    assert sorted(per_step(straight_dir, "loss")) == list(range(1, STEPS + 1))
    assert ledger(killed_dir) == ledger(straight_dir)
    consumed = [i for record in ledger(straight_dir)[:16] for i in record["sample_ids"]]
    assert sorted(consumed) == list(range(64)), "each sample once per epoch"
    stem = "adapter_model.safetensors" if method else "model.safetensors"
    expected, got = weights(straight_dir, stem), weights(killed_dir, stem)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    biases = [got[name] for name in got if name.endswith("e_score_correction_bias")]
    assert bool(biases) == (method is None or method is BIASED_LORA)  # an adapter saves them in its gates only
    assert all(float(bias.abs().sum()) > 0 for bias in biases), "the correction bias moved during training"
