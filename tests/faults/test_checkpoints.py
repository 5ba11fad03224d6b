"""Checkpoints under faults: killed mid-save, corrupted on disk, disk full, and rotation."""

import json
import shutil

import pytest
import torch

from dsft.train.checkpoints import (
    checkpoint_problem,
    list_checkpoints,
    rotate,
    write_manifest,
)

from .conftest import fault_env, make_config, per_step, run_dsft, weights

# torch.save calls per checkpoint of a full fine-tune: training_args.bin, optimizer.pt, scheduler.pt, rng_state.pth.
SAVES_PER_CHECKPOINT = 4


def checkpointing_config(tmp_path, tiny_data, steps=20):
    return make_config(
        tmp_path, tiny_data, method={"type": "full"},
        train={"max_steps": steps, "batch_size": 4, "save_steps": 10, "keep_last_checkpoints": 3},
    )


def test_kill_in_the_middle_of_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, tiny_data):
    config = checkpointing_config(tmp_path, tiny_data)
    root = tmp_path / "run" / "checkpoints"
    # SIGKILL at the first torch.save of the second checkpoint: its weights are written, its optimizer is not.
    killed = run_dsft("train", config, env=fault_env(tmp_path, "kill", SAVES_PER_CHECKPOINT + 1))
    assert killed.returncode == -9
    assert [step for step, _ in list_checkpoints(root)] == [10]
    torn = root / ".staging" / "checkpoint-20"
    assert (torn / "model.safetensors").is_file() and not (torn / "optimizer.pt").exists()
    assert checkpoint_problem(root / "checkpoint-10") is None

    resumed = run_dsft("train", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "checkpoint-10" in resumed.stdout
    assert not torn.exists(), "the next save clears what the killed one left"
    assert [step for step, _ in list_checkpoints(root)] == [20, 10]
    assert sorted(per_step(tmp_path / "run", "loss")) == list(range(1, 21))


def test_a_flipped_byte_makes_resume_fall_back_to_the_previous_checkpoint(tmp_path, tiny_data):
    config = checkpointing_config(tmp_path, tiny_data)
    assert run_dsft("train", config).returncode == 0
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    final = weights(run_dir)
    weights_file = root / "checkpoint-20" / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    for name in ("model.safetensors", "summary.json"):
        (run_dir / name).unlink()

    resumed = run_dsft("train", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    output = resumed.stdout
    assert "skipping" in output and "checkpoint-20: model.safetensors: sha256 differs" in output
    assert "resuming from" in output and "checkpoint-10" in output
    again = weights(run_dir)
    assert all(torch.equal(final[name], again[name]) for name in final), "steps 11-20 redone exactly"


def test_disk_full_never_replaces_a_good_checkpoint_and_says_what_it_needs(tmp_path, tiny_data):
    config = checkpointing_config(tmp_path, tiny_data)
    root = tmp_path / "run" / "checkpoints"
    failed = run_dsft("train", config, env=fault_env(tmp_path, "enospc", SAVES_PER_CHECKPOINT + 1))
    assert failed.returncode == 2, failed.stderr
    message = " ".join(failed.stderr.split())
    assert f"disk full writing a checkpoint under {root}" in message
    assert "MiB and" in message and "MiB are free" in message and "checkpoint-10 is untouched" in message
    assert "Traceback" not in failed.stderr
    assert [step for step, _ in list_checkpoints(root)] == [10]
    assert checkpoint_problem(root / "checkpoint-10") is None
    assert not (root / ".staging").exists()


def fake_checkpoint(root, step, sound=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(bytes(range(step % 250)) * 10)
    if sound:
        write_manifest(path, step)
    return path


def test_rotation_keeps_the_last_sound_checkpoints_and_never_the_only_good_one_away(tmp_path):
    good = fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20, sound=False)  # torn, newer than the only good one
    assert rotate(tmp_path, keep_last=1) == []
    assert good.is_dir()
    newest = fake_checkpoint(tmp_path, 30)
    deleted = rotate(tmp_path, keep_last=1)
    assert sorted(p.name for p in deleted) == ["checkpoint-10", "checkpoint-20"]
    assert [p for _, p in list_checkpoints(tmp_path)] == [newest]


def test_rotation_protects_the_best_checkpoint(tmp_path):
    best = fake_checkpoint(tmp_path, 10)
    for step in (20, 30):
        fake_checkpoint(tmp_path, step)
    rotate(tmp_path, keep_last=1, protect=best)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [30, 10]


@pytest.mark.parametrize("listed", ["../outside.bin", "/etc/passwd"])
def test_a_manifest_that_points_outside_the_checkpoint_is_refused(tmp_path, listed):
    path = fake_checkpoint(tmp_path, 10)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"].append({"path": listed, "bytes": 1, "sha256": "0" * 64})
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert "outside the checkpoint" in checkpoint_problem(path)


def test_a_file_truncated_after_the_manifest_is_caught_without_hashing(tmp_path):
    path = fake_checkpoint(tmp_path, 10)
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(5)
    assert "5 bytes, manifest says" in checkpoint_problem(path, hashes=False)
    shutil.rmtree(path)
    assert checkpoint_problem(path) == "no manifest (the save did not finish)"
