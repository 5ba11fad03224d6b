"""SIGTERM / SIGINT to a real training process: finish the step, save, exit 75, say how to resume."""

import signal
import subprocess

import pytest

from dsft.train.checkpoints import checkpoint_problem, list_checkpoints

from .conftest import dsft_command, make_config, per_step, run_dsft, wait_for


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_with_the_resume_command(tmp_path, tiny_data, sig):
    # No save_steps: the only checkpoint is the one the signal asks for.
    config = make_config(tmp_path, tiny_data, method={"type": "full"}, train={"max_steps": 40, "batch_size": 4})
    run_dir = tmp_path / "run"
    process = subprocess.Popen(dsft_command("train", config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file() or process.poll() is not None, what="the first step")
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr

    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert len(checkpoints) == 1
    step, path = checkpoints[0]
    assert 0 < step < 40 and checkpoint_problem(path) is None
    assert max(per_step(run_dir, "loss")) == step, "the step under way when the signal came was finished"
    message = " ".join(stderr.split())
    assert f"stopped by {sig.name} at step {step}" in message
    assert f"Resume with: dsft train {config} --resume" in message and "Traceback" not in stderr

    if sig == signal.SIGTERM:
        resumed = run_dsft("train", config, "--resume")  # exactly the command the message gave
        assert resumed.returncode == 0, resumed.stderr
        assert sorted(per_step(run_dir, "loss")) == list(range(1, 41))
