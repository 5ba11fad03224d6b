"""dsft train --nproc 2 on CPU (gloo): the same per-step losses as one process with the same global batch, exact
resume from a checkpoint, the same run-directory format, and a failing rank named in the error."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.recipes.conftest import make_config, train_losses

FULL_QWEN = {"model": {"preset": "tiny-qwen2"}, "method": {"type": "full"}}
STEPS = {"max_steps": 4, "save_steps": 2, "batch_size": 8}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install deepspeed)")


# Tolerances. Each comparison's two sides run on the same CPU path (the test's ATEN_CPU_CAPABILITY; OMP_NUM_THREADS=1
# for every child, set by dsft_train) but with different micro-batch shapes, so their sums run in different orders:
# equal up to rounding, not bitwise. Resuming replays the same shapes on the same path (rel 1e-5). Gathered weights
# and adapters are compared at rtol 1e-3 (AdamW's steps are lr-sized, so a weight's rounding gap is of that order).
FIRST_STEPS, FIRST_STEPS_REL, LATER_STEPS_REL = 2, 1e-4, 1e-3


def assert_same_trajectory(got: dict[int, float], want: dict[int, float]) -> None:
    """The same per-step losses. Step 1 (no update yet) and step 2 (after one full, evenly split step) agree to
    rel 1e-4; AdamW turns rounding-level gradient differences into learning-rate-sized steps, so later steps drift
    (rel 2.5e-4 at step 4 of the reward pairs below, on the default and avx2 paths) and get rel 1e-3. A real
    weighting bug is far outside both: with the short step's micro-batches left unweighted (trl_stage's weight
    forced to 1), step 2 moved by rel 2.4e-3 (DPO) and 5.0e-3 (reward), steps 3-4 by 1.3e-3 to 1.1e-1."""
    assert list(got) == list(want)
    for step, loss in want.items():
        rel = FIRST_STEPS_REL if step <= FIRST_STEPS else LATER_STEPS_REL
        assert got[step] == pytest.approx(loss, rel=rel), f"step {step}: {got} against {want}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dsft_train(config: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a child process (so torch.distributed.run can start its own)."""
    command = [sys.executable, "-m", "dsft.cli", "train", str(config), *args]
    if "--nproc" in args:
        command += ["--master-port", str(_free_port())]
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=child_env, timeout=300, check=False)


def _run(tmp_path: Path, tiny_data: dict, name: str, *args: str, sections: dict, **train) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    config = make_config(folder, tiny_data, **sections, train={**STEPS, **train})
    result = dsft_train(config, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data) -> dict:
    """One process with batch 8, and two processes with batch 4 each (the same global batch), full fine-tuning."""
    root = tmp_path_factory.mktemp("distributed")
    return {
        "single": _run(root, tiny_data, "single", sections=FULL_QWEN),
        "ddp": _run(root, tiny_data, "ddp", "--nproc", "2", sections=FULL_QWEN, batch_size=4),
    }


def test_ddp_two_ranks_equal_one_process(runs):
    single, ddp = train_losses(runs["single"]), train_losses(runs["ddp"])
    assert list(ddp) == [1, 2, 3, 4]
    assert_same_trajectory(ddp, single)
    ledger = [json.loads(line)["sample_ids"] for line in (runs["ddp"] / "samples.jsonl").read_text().splitlines()]
    consumed = [i for ids in ledger for i in ids]
    assert len(consumed) == len(set(consumed)) == 32  # 4 steps x 8: no sample repeated or dropped across ranks
    engine = json.loads((runs["ddp"] / "distributed.json").read_text())
    assert (engine["engine"], engine["world_size"]) == ("ddp", 2)


def test_ddp_output_has_the_single_process_format_and_loads(runs):
    from transformers import AutoModelForCausalLM

    def listing(run_dir: Path) -> set[str]:
        return {path.name for path in run_dir.iterdir()}

    assert listing(runs["ddp"]) == listing(runs["single"])
    checkpoint_files = {p.name for p in (runs["ddp"] / "checkpoints" / "checkpoint-4").iterdir()}
    assert {"model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= checkpoint_files
    model = AutoModelForCausalLM.from_pretrained(runs["ddp"])
    assert sum(p.numel() for p in model.parameters()) == 886_912


def test_ddp_resume_reproduces_the_trajectory(runs, tmp_path):
    _resume_from_step_2(runs["ddp"], tmp_path / "run", "--nproc", "2")


def test_ddp_lora_adapter_loads_in_peft(tmp_path, tiny_data):
    from peft import AutoPeftModelForCausalLM

    run_dir = _run(tmp_path, tiny_data, "lora", "--nproc", "2", sections={}, batch_size=4, max_steps=2, save_steps=None)
    assert (run_dir / "adapter_model.safetensors").is_file() and not (run_dir / "model.safetensors").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(run_dir)
    assert model.peft_config["default"].r == 8


def test_an_epoch_that_does_not_divide_trains_each_sample_once_across_ranks(tmp_path, tiny_data):
    """14 samples, 2 ranks x batch 2 x 2 accumulation steps (8 a step): each epoch is a full step and a step whose
    6 samples fill 4 micro-batches of 2, 2, 1, 1 (data.batches), where accelerate's even batches trained 2 samples
    twice. The steps equal one process with batch 4 x 2 accumulation steps (8, then 6 samples)."""
    small = {"max_steps": 4, "save_steps": None, "grad_accum_steps": 2}  # 2 epochs
    sections = {**FULL_QWEN, "data": {"max_samples": 14}}
    single = _run(tmp_path, tiny_data, "single", sections=sections, batch_size=4, **small)
    ddp = _run(tmp_path, tiny_data, "ddp", "--nproc", "2", sections=sections, batch_size=2, **small)
    assert_same_trajectory(train_losses(ddp), train_losses(single))
    ledger = [json.loads(line)["sample_ids"] for line in (ddp / "samples.jsonl").read_text().splitlines()]
    assert [len(ids) for ids in ledger] == [8, 6, 8, 6]
    for epoch in (ledger[:2], ledger[2:]):
        assert sorted(i for ids in epoch for i in ids) == list(range(14))


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_pairs_of_an_epoch_that_does_not_divide_train_once_and_weigh_the_same(tmp_path, stage):
    """The pair stages (TRL's trainers, mean losses per micro-batch) on 14 pairs, 8 a step: 2 ranks x batch 2 x 2
    accumulation steps deal each epoch's last 6 pairs as 2, 2, 1, 1 and train each pair once; weighted by its pairs
    (trl_stage.DsftTrlTrainer), every step equals one process with one batch of 8 (then 6), and one process with
    batch 4 x 2 accumulation steps (4 + 2 in the short step)."""
    from tests.recipes.test_reward import planted_pairs

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in planted_pairs(14)), encoding="utf-8")
    losses = {}
    for name, args, train in (("one_batch", (), {"batch_size": 8}),
                              ("accumulated", (), {"batch_size": 4, "grad_accum_steps": 2}),
                              ("ddp", ("--nproc", "2"), {"batch_size": 2, "grad_accum_steps": 2})):
        (tmp_path / name).mkdir()
        config = make_config(tmp_path / name, {"train": pairs}, **FULL_QWEN, data={"max_length_tokens": 48},
                             train={"max_steps": 4, "learning_rate": 1e-3, **train})
        config.write_text(f"stage: {stage}\n" + config.read_text(encoding="utf-8"), encoding="utf-8")
        result = dsft_train(config, *args)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        losses[name] = train_losses(tmp_path / name / "run")
    assert list(losses["ddp"]) == [1, 2, 3, 4]
    assert_same_trajectory(losses["accumulated"], losses["one_batch"])
    assert_same_trajectory(losses["ddp"], losses["one_batch"])
    ledger = [json.loads(line)["sample_ids"] for line in (tmp_path / "ddp/run/samples.jsonl").read_text().splitlines()]
    assert [len(ids) for ids in ledger] == [8, 6, 8, 6]
    for epoch in (ledger[:2], ledger[2:]):
        assert sorted(i for ids in epoch for i in ids) == list(range(14))


def test_multitask_heads_weigh_each_labelled_item_the_same_across_ranks(tmp_path):
    """Three heads on 14 partially labelled records, 2 ranks x batch 2 x 2 accumulation steps (an uneven last step of
    each epoch): the same losses as one process with batch 8, each head's loss a mean over the step's items."""
    import random

    from tests.recipes.test_multitask import multitask_config, synthetic_record

    rng = random.Random(0)
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(synthetic_record(rng, i)) + "\n" for i in range(14)), encoding="utf-8")
    losses = {}
    for name, args, train in (("one_batch", (), {"batch_size": 8}),
                              ("ddp", ("--nproc", "2"), {"batch_size": 2, "grad_accum_steps": 2})):
        (tmp_path / name).mkdir()
        config = multitask_config(tmp_path / name, data, {"preset": "tiny-qwen2"}, {"type": "full"}, max_steps=4,
                                  logging_steps=1, eval_steps=None, **train)
        text = config.read_text(encoding="utf-8").replace("validation_ratio: 0.25", "validation_ratio: 0.0")
        config.write_text(text, encoding="utf-8")
        result = dsft_train(config, *args)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        losses[name] = train_losses(tmp_path / name / "run")
    assert list(losses["ddp"]) == [1, 2, 3, 4]
    assert_same_trajectory(losses["ddp"], losses["one_batch"])


def test_a_failing_rank_stops_the_job_and_is_named(tmp_path, tiny_data):
    config = make_config(tmp_path, tiny_data, **FULL_QWEN, train=STEPS)
    result = dsft_train(config, "--nproc", "2", env={"DSFT_TEST_FAIL_RANK": "1"})
    assert result.returncode != 0
    assert "rank 1: RuntimeError: failure injected by DSFT_TEST_FAIL_RANK" in result.stderr


def test_fsdp2_two_ranks_equal_one_process_and_resume(runs, tmp_path, tiny_data):
    """FSDP2 on CPU workers (gloo): accelerate's own FSDP2 path, enabled by dsft where accelerate would fall back
    to DDP (distributed.enable_fsdp_on_cpu)."""
    run_dir = _run(tmp_path, tiny_data, "fsdp2", "--nproc", "2", sections=FULL_QWEN, batch_size=4, distributed="fsdp2")
    assert_same_trajectory(train_losses(run_dir), train_losses(runs["single"]))
    assert json.loads((run_dir / "distributed.json").read_text())["training_arguments"]["fsdp_config"]["version"] == 2
    # Written only by accelerate's FSDP checkpoint code: the run really was sharded, not DDP.
    assert (run_dir / "checkpoints" / "checkpoint-4" / "pytorch_model_fsdp.bin").is_file()
    assert {p.name for p in run_dir.iterdir()} == {p.name for p in runs["single"].iterdir()}
    _assert_same_weights(run_dir, runs["ddp"])  # the full state dict gathered from the shards
    _resume_from_step_2(run_dir, tmp_path / "resumed", "--nproc", "2")


@pytest.fixture(scope="module")
def bf16_single(tmp_path_factory, tiny_data) -> Path:
    return _run(tmp_path_factory.mktemp("bf16"), tiny_data, "single", sections=FULL_QWEN, mixed_precision="bf16",
                save_steps=None)


@pytest.mark.parametrize("engine", ["fsdp2", pytest.param("zero3", marks=needs_deepspeed)])
def test_mixed_precision_passes_through_and_weights_keep_the_model_dtype(bf16_single, tmp_path, tiny_data, engine):
    import torch
    from safetensors.torch import load_file

    run_dir = _run(tmp_path, tiny_data, engine, "--nproc", "2", sections=FULL_QWEN, batch_size=4, distributed=engine,
                   mixed_precision="bf16", save_steps=None)
    assert json.loads((run_dir / "distributed.json").read_text())["mixed_precision"] == "bf16"
    assert train_losses(run_dir) == pytest.approx(train_losses(bf16_single), rel=1e-2)  # bf16 rounds per engine
    weights = load_file(run_dir / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # the model's dtype, as one process saves it
    trained = weights["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(trained.to(torch.bfloat16).float(), trained)  # float32 masters, not 16-bit copies


def test_fsdp2_lora_on_deepseek_moe_equals_one_process(tmp_path, tiny_data):
    small = {"max_steps": 3, "save_steps": None}
    single = _run(tmp_path, tiny_data, "single", sections={}, **small)
    fsdp2 = _run(tmp_path, tiny_data, "fsdp2", "--nproc", "2", sections={}, batch_size=4, distributed="fsdp2", **small)
    assert_same_trajectory(train_losses(fsdp2), train_losses(single))
    _assert_same_adapter(fsdp2, single)


@needs_deepspeed
@pytest.mark.parametrize("engine", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_two_ranks_equal_one_process(runs, tmp_path, tiny_data, engine):
    run_dir = _run(tmp_path, tiny_data, engine, "--nproc", "2", sections=FULL_QWEN, batch_size=4, distributed=engine)
    assert_same_trajectory(train_losses(run_dir), train_losses(runs["single"]))
    assert json.loads((run_dir / "distributed.json").read_text())["training_arguments"]["deepspeed"]
    assert {p.name for p in run_dir.iterdir()} == {p.name for p in runs["single"].iterdir()}
    _assert_same_weights(run_dir, runs["ddp"])  # gathered from the shards: the model DDP trained
    # sharded checkpoint (one optimizer shard per rank; offloaded states come back from CPU), then --resume from it
    _resume_from_step_2(run_dir, tmp_path / "resumed", "--nproc", "2")


def _assert_same_weights(run_dir: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    weights, expected = load_file(run_dir / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name, tensor in weights.items():
        assert tensor.shape == expected[name].shape and tensor.allclose(expected[name], rtol=1e-3, atol=1e-5), name


def _resume_from_step_2(run_dir: Path, resumed: Path, *args: str) -> None:
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-4")  # as if stopped after the checkpoint of step 2
    result = dsft_train(resumed / "config.yaml", "--set", f"output.dir={resumed}", *args, "--resume")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming from" in result.stdout
    assert train_losses(resumed) == pytest.approx(train_losses(run_dir), rel=1e-5)


@needs_deepspeed
def test_deepseek_moe_blocks_are_zero3_leaves(monkeypatch):
    from transformers import AutoModelForCausalLM

    from dsft.models.presets import preset_config
    from dsft.train.distributed import mark_moe_leaves

    model = AutoModelForCausalLM.from_config(preset_config("tiny-deepseek-v3", 512, 1, 2, 0))
    assert mark_moe_leaves(model, "zero3") == []  # one process: nothing to fetch
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert mark_moe_leaves(model, "zero2") == []
    assert mark_moe_leaves(model, "zero3") == ["DeepseekV3MoE"]
    moe_blocks = [m for m in model.modules() if type(m).__name__ == "DeepseekV3MoE"]
    assert len(moe_blocks) == 3 and all(m._z3_leaf for m in moe_blocks)  # the attribute DeepSpeed reads


@needs_deepspeed
@pytest.mark.parametrize(("engine", "preset"), [("zero2", "tiny-deepseek-v3"), ("zero3", "tiny-deepseek-v3"),
                                               ("zero3", "tiny-deepseek-v2")])
def test_deepseek_moe_lora_under_deepspeed_equals_one_process(tmp_path, tiny_data, engine, preset):
    """LoRA on attention, router and routed experts of the tiny DeepSeek-V3 and of the V2-Lite layout (under zero3
    their MoE blocks are leaves): same losses, same adapter files and values."""
    small, model = {"max_steps": 3, "save_steps": None}, {"model": {"preset": preset}}
    single = _run(tmp_path, tiny_data, "single", sections=model, **small)
    sharded = _run(tmp_path, tiny_data, engine, "--nproc", "2", sections=model, batch_size=4, distributed=engine,
                   **small)
    assert_same_trajectory(train_losses(sharded), train_losses(single))
    _assert_same_adapter(sharded, single)


def _assert_same_adapter(run_dir: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    adapter = load_file(run_dir / "adapter_model.safetensors")
    expected = load_file(reference / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys()
    assert all(adapter[k].allclose(expected[k], rtol=1e-3, atol=1e-3) for k in adapter)


@pytest.mark.parametrize("engine", ["ddp", pytest.param("zero2", marks=needs_deepspeed), "fsdp2"])
def test_chunked_loss_runs_through_the_data_parallel_wrapper(runs, tmp_path, tiny_data, engine):
    # The chunked loss runs inside the wrapper's forward (in the lm_head's call, where FSDP2 has the weight whole),
    # so its gradients are synchronised like the model's own: the same losses and weights as one process.
    run_dir = _run(tmp_path, tiny_data, engine, "--nproc", "2", sections=FULL_QWEN, batch_size=4, distributed=engine,
                   chunked_loss="on", loss_chunk_tokens=16, save_steps=None)
    assert_same_trajectory(train_losses(run_dir), train_losses(runs["single"]))
    speed = json.loads((run_dir / "summary.json").read_text())["speed"]
    assert (speed["chunked_loss"], speed["loss_chunk_tokens"], speed["chunked_loss_micro_batches"]) == (True, 16, 4)
    _assert_same_weights(run_dir, runs["ddp"])


def test_bias_updates_of_two_ranks_equal_one_process_on_the_same_global_batch(tmp_path, tiny_data):
    """DeepSeek-V3's bias rule from the loads of all ranks together (summed after each step): two processes with
    batch 4 count the same (token, expert) pairs as one with batch 8, step by step, and end with the same bias. The
    rule moves by sign, so a load off by one would change it by 2 x gamma: equality here is exact."""
    from safetensors.torch import load_file

    moe = {"type": "full", "moe": {"router": "train", "bias_update": "on", "bias_update_speed": 0.01}}
    sections = {"model": {"preset": "tiny-deepseek-v3"}, "method": moe}
    small = {"max_steps": 3, "save_steps": None, "logging_steps": 1}
    single = _run(tmp_path, tiny_data, "single", sections=sections, batch_size=8, **small)
    ddp = _run(tmp_path, tiny_data, "ddp", "--nproc", "2", sections=sections, batch_size=4, **small)
    loads = {}
    for name, run_dir in (("single", single), ("ddp", ddp)):
        report = json.loads((run_dir / "expert_load.json").read_text())
        loads[name] = [layer["routed_pairs"] for layer in report["phases"]["training"]["per_layer"]]
        loads[name + "_shares"] = [layer["share"] for layer in report["phases"]["training"]["per_layer"]]
    assert loads["ddp"] == loads["single"] and loads["ddp_shares"] == loads["single_shares"]
    windows = {name: [r["moe_load_cv"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                      if "moe_load_cv" in r] for name, d in (("single", single), ("ddp", ddp))}
    assert windows["ddp"] == windows["single"] and len(windows["ddp"]) == 3
    biases = {name: {k: v for k, v in load_file(d / "model.safetensors").items() if k.endswith("correction_bias")}
              for name, d in (("single", single), ("ddp", ddp))}
    assert biases["ddp"].keys() == biases["single"].keys() and len(biases["ddp"]) == 3
    assert all(torch.equal(biases["ddp"][k], biases["single"][k]) for k in biases["ddp"])
    assert any(float(bias.abs().sum()) > 0 for bias in biases["ddp"].values())
