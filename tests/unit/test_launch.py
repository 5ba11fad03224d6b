"""The launcher's command line and the engines' settings, exact."""

import sys

import pytest

from dsft.errors import DsftError
from dsft.train.distributed import deepspeed_config, engine_arguments
from dsft.train.launch import Topology, launch, torchrun_command


def test_torchrun_command_for_the_second_node():
    command = torchrun_command(Topology(8, 2, 1, "10.0.0.1", 29501), ["train", "run.yaml", "--resume"])
    assert command == [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=8", "--nnodes=2", "--node-rank=1",
        "--master-addr=10.0.0.1", "--master-port=29501", "-m", "dsft.cli", "train", "run.yaml", "--resume",
    ]
    with pytest.raises(DsftError, match="node-rank"):
        torchrun_command(Topology(8, 2, 2), ["train", "run.yaml"])


def test_a_worker_never_launches_again(monkeypatch):
    assert Topology(2).launches and not Topology(1).launches
    monkeypatch.setenv("RANK", "0")
    assert not Topology(2).launches


def test_a_single_process_stage_is_refused_before_any_worker_starts():
    with pytest.raises(DsftError, match="stage ppo runs in one process"):
        launch(Topology(2), ["train", "run.yaml"], ["sft", "ppo"])


def test_deepspeed_configs():
    zero2, zero3, offload = (deepspeed_config(engine, 1.0) for engine in ("zero2", "zero3", "zero3_offload"))
    assert zero2["zero_optimization"]["stage"] == 2 and "offload_param" not in zero2["zero_optimization"]
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert zero2["bf16"] == {"enabled": "auto"} and zero2["gradient_clipping"] == 1.0  # from the Trainer's arguments


def test_engine_arguments_by_world_size(monkeypatch):
    assert engine_arguments("zero3", 1.0) == {}  # one process: the engine is ignored
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert engine_arguments("ddp", 1.0) == {"ddp_find_unused_parameters": False}
    assert engine_arguments("zero3", 1.0)["deepspeed"]["zero_optimization"]["stage"] == 3


def test_a_stop_by_signal_says_how_to_resume_all_ranks():
    from dsft.train.launch import _with_resume_command

    worker = "distributed training stopped: rank 0: stopped by SIGTERM at step 3; Resume with: dsft train a.yaml --resume"
    message = _with_resume_command(worker, Topology(4), ["train", "a.yaml", "--set", "train.seed=1"])
    assert message.endswith("Resume with: dsft train a.yaml --set train.seed=1 --nproc=4 --resume")
    assert _with_resume_command("rank 1: bad", Topology(4), ["train", "a.yaml"]) == "rank 1: bad"
