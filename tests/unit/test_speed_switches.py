"""Speed switches: what auto resolves to on this (CPU) machine, refusals of on, and the same training losses with
each switch on and off (the Trainer path of dsft train: plan, build_trainer, DsftTrainer)."""

import importlib.util

import pytest
import torch
from rich.console import Console
from torch.utils._python_dispatch import TorchDispatchMode

from dsft.config import RunConfig
from dsft.errors import DsftError
from dsft.models.kernels import apply_speed_plan, enable_checkpointing, optimizer_name, resolve_speed_plan
from dsft.models.method import apply_method
from dsft.models.presets import build_preset
from dsft.train.loop import build_trainer
from dsft.train.sft import _Collator


def _config(tmp_path, preset="tiny-qwen2", lora=True, **train) -> RunConfig:
    train = {"max_steps": 3, "batch_size": 4, "logging_steps": 1, "learning_rate": 1e-2, "lr_scheduler": "constant",
             "seed": 0, "tensorboard": False, **train}
    return RunConfig.model_validate({
        "model": {"preset": preset}, "data": {"train_files": ["unused.jsonl"], "max_length_tokens": 32},
        "method": {"type": "lora" if lora else "full"}, "train": train, "output": {"dir": str(tmp_path / "run")}})


def _model(config: RunConfig, tokenizer):
    return apply_method(build_preset(config.model.preset, tokenizer, seed=0, dtype=torch.float32), config.method)


def _rows(tokenizer, count=24):
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(count):
        length = int(torch.randint(6, 30, (1,), generator=generator))
        ids = torch.randint(10, len(tokenizer), (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "sample_id": i})
    return rows


def _train_losses(tmp_path, tokenizer, **train) -> list[float]:
    config = _config(tmp_path, **train)
    model = _model(config, tokenizer)
    plan = resolve_speed_plan(config.train, model)
    apply_speed_plan(model, plan)
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    trainer, guards = build_trainer(config, tmp_path / "run", model, tokenizer, _rows(tokenizer), [], Console(quiet=True),
                                    _Collator(tokenizer), loss_chunk_tokens=plan.loss_chunk_tokens if plan.chunked_loss else None)
    try:
        trainer.train()
    finally:
        guards.progress.stop()
        guards.stop_on_signal.restore()
    return [record["loss"] for record in trainer.state.log_history if "loss" in record]


def test_auto_on_cpu(tmp_path, tokenizer):
    moe = resolve_speed_plan(_config(tmp_path, "tiny-deepseek-v3").train, _model(_config(tmp_path, "tiny-deepseek-v3"), tokenizer), cuda=False)
    assert moe.line() == ("kernels: liger off (no CUDA), chunked loss off (no CUDA: the model's own loss), experts grouped_mm, "
                          "fused AdamW on, compile off (train.compile: false), checkpointing off, attention unchanged (no packing)")
    dense = resolve_speed_plan(_config(tmp_path, gradient_checkpointing=True, checkpointing="selective").train,
                               _model(_config(tmp_path), tokenizer), cuda=False)
    assert (dense.experts, dense.checkpointing, dense.chunked_loss) == (None, "selective", False)
    assert "experts n/a" in dense.line()
    assert resolve_speed_plan(_config(tmp_path, chunked_loss="on").train, _model(_config(tmp_path), tokenizer), cuda=False).chunked_loss
    assert optimizer_name("auto") == "adamw_torch_fused" and optimizer_name("off") == "adamw_torch"


def test_on_is_refused_where_it_cannot_apply(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    with pytest.raises(DsftError, match="train.liger: on, but no CUDA"):
        resolve_speed_plan(_config(tmp_path, liger="on").train, _model(_config(tmp_path), tokenizer), cuda=False)
    head_lora = get_peft_model(build_preset("tiny-qwen2", tokenizer, 0, torch.float32), LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(DsftError, match="train.chunked_loss: on, but LoRA adapts the lm_head"):
        resolve_speed_plan(_config(tmp_path, chunked_loss="on").train, head_lora, cuda=True)


SWITCHES = {
    "chunked loss, packed, accumulated": ({"packing": True, "grad_accum_steps": 2, "chunked_loss": "off"},
                                          {"packing": True, "grad_accum_steps": 2, "chunked_loss": "on", "loss_chunk_tokens": 16}),
    "chunked loss, padded": ({"chunked_loss": "off"}, {"chunked_loss": "on", "loss_chunk_tokens": 16}),
    "fused AdamW": ({"fused_optimizer": "off"}, {"fused_optimizer": "on"}),
    "checkpointing full": ({}, {"gradient_checkpointing": True, "checkpointing": "full"}),
    "checkpointing selective": ({}, {"gradient_checkpointing": True, "checkpointing": "selective"}),
    "checkpointing offload": ({}, {"gradient_checkpointing": True, "checkpointing": "offload"}),
}


@pytest.mark.parametrize("switch", SWITCHES)
def test_switch_leaves_the_losses_unchanged(tmp_path, tokenizer, switch):
    without, with_switch = SWITCHES[switch]
    expected = _train_losses(tmp_path / "without", tokenizer, **without)
    assert len(expected) == 3
    torch.testing.assert_close(_train_losses(tmp_path / "with", tokenizer, **with_switch), expected, rtol=1e-4, atol=1e-5)


def test_experts_implementations_leave_the_losses_unchanged(tmp_path, tokenizer):
    # LoRA on tiny DeepSeek-V3 adapts the routed experts (PEFT target_parameters); grouped_mm is dsft's low-rank path.
    expected = _train_losses(tmp_path / "eager", tokenizer, preset="tiny-deepseek-v3", experts="eager", chunked_loss="on")
    for implementation in ("grouped_mm", "batched_mm"):
        losses = _train_losses(tmp_path / implementation, tokenizer, preset="tiny-deepseek-v3", experts=implementation,
                               chunked_loss="on")
        torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-5, msg=implementation)


class _OpCounts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_recomputes_all_but_attention(tmp_path, tokenizer):
    ids = torch.randint(10, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    recomputed = {}
    for mode in ("off", "full", "selective"):
        model = _model(_config(tmp_path, lora=False), tokenizer)
        enable_checkpointing(model, mode)
        loss = model(input_ids=ids, labels=ids).loss
        with _OpCounts() as ops:
            loss.backward()
        attention = sum(n for op, n in ops.counts.items() if "scaled_dot_product" in str(op) and "backward" not in str(op))
        recomputed[mode] = (attention, ops.counts[torch.ops.aten.mm.default])
    assert recomputed["off"][0] == recomputed["selective"][0] == 0 < recomputed["full"][0]
    assert recomputed["off"][1] < recomputed["selective"][1] == recomputed["full"][1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("switch", [{"compile": True}, {"gradient_checkpointing": True, "checkpointing": "offload"},
                                    {"chunked_loss": "on"}, {"experts": "grouped_mm", "preset": "tiny-deepseek-v3"},
                                    {"liger": "on"}])
def test_gpu_switch_leaves_the_losses_unchanged(tmp_path, tokenizer, switch):
    # compile runs on CPU too and gives the same losses, but compiling on 2 CPU cores took minutes; bf16 on CUDA.
    if switch.get("liger") == "on" and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed")
    preset = switch.get("preset", "tiny-qwen2")
    settings = {k: v for k, v in switch.items() if k != "preset"}
    # Every switch is measured against all of them off (liger: auto would be on with CUDA and liger-kernel).
    baseline = {"chunked_loss": "off", "liger": "off", **({"experts": "eager"} if preset == "tiny-deepseek-v3" else {})}
    expected = _train_losses(tmp_path / "without", tokenizer, preset=preset, **baseline)
    actual = _train_losses(tmp_path / "with", tokenizer, preset=preset, **{**baseline, **settings})
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=1e-3)


def test_several_zero3_processes_keep_the_models_own_loss(tmp_path, tokenizer, monkeypatch):
    model = _model(_config(tmp_path), tokenizer)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for engine in ("zero3", "zero3_offload"):
        plan = resolve_speed_plan(_config(tmp_path, distributed=engine).train, model, cuda=True)
        assert not plan.chunked_loss and f"chunked loss off (train.distributed: {engine} partitions" in plan.line()
        with pytest.raises(DsftError, match=f"train.chunked_loss: on, but train.distributed: {engine} partitions"):
            resolve_speed_plan(_config(tmp_path, distributed=engine, chunked_loss="on").train, model, cuda=True)
    for engine in ("ddp", "zero2", "fsdp2"):
        assert resolve_speed_plan(_config(tmp_path, distributed=engine).train, model, cuda=True).chunked_loss
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: the engine is not used
    assert resolve_speed_plan(_config(tmp_path, distributed="zero3").train, model, cuda=True).chunked_loss
