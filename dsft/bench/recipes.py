"""The three recipes `dsft bench` compares, each training a fresh random-init model of a setup's shape (same seed,
same samples, same optimizer settings) and returning what it measured.

- B0, plain: transformers' Trainer, PEFT LoRA (or full), padded batches of 4, SDPA, the model's own loss (full
  logits), transformers' defaults otherwise (its default experts kernel and fused AdamW).
- B1, the best of TRL alone: trl's SFTTrainer with packing (best-fit decreasing rows), padding_free, its chunked
  log-prob head, use_liger_kernel where Liger is installed and the model dense (Liger's module swap would replace
  the MoE experts and PEFT's LoRA on them), and for MoE transformers' grouped_mm with PEFT.
- dsft: dsft's own trainer (build_trainer) with packing and the speed plan: chunked loss, dsft_grouped_mm for LoRA on
  experts, Liger on dense models, fused AdamW.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import gc
import tempfile
from pathlib import Path

from dsft.bench import measure, profile
from dsft.bench.suites import Setup

PAD_ID = 0
EOS_ID = 1
LEARNING_RATES = {"lora": 1e-4, "full": 1e-5}
"""Small enough that the loss moves little over the steps: the gate compares recipes whose steps hold different
(equally distributed) samples."""
B0_BATCH = 4


@dataclasses.dataclass
class RecipeRun:
    """One recipe's training of one setup."""

    measured: measure.Measured
    peak_gib: float | None
    """torch.cuda.max_memory_allocated over the recipe (model, optimizer, activations); None on CPU."""
    settings: dict
    longest_tokens: int | None = None
    profile: dict | None = None
    """Where the measured steps spent their time (bench.profile.summarize), in a run under profiling()."""


def build_model(setup: Setup, seed: int):
    """A random-init model of setup.shape on the training device (bf16 on CUDA, float32 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsft.models.shapes import shape_config

    config = shape_config(setup.shape, pad_token_id=PAD_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID)
    cuda = torch.cuda.is_available()
    torch.manual_seed(seed)
    with torch.device("cuda" if cuda else "cpu"):  # initialised where it trains: a 16B model would take minutes on CPU
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)


def lora_config(setup: Setup, model):
    """The PEFT LoraConfig of B0 and B1: the one dsft's apply_method builds for the same method section (on an MoE
    model its targets are spelled out, models/moe_targets.py), so the three recipes train the same adapter."""
    from dsft.config import LoraConfig, MethodConfig
    from dsft.models.families import model_type_of
    from dsft.models.method import lora_config as dsft_lora_config

    method = MethodConfig(type="lora", lora=LoraConfig(r=setup.lora_rank, alpha=2 * setup.lora_rank))
    return dsft_lora_config(method, model_type=model_type_of(model), model=model)


def run_b0(setup: Setup, samples: list[dict], seed: int, work_dir: Path) -> RecipeRun:
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from dsft.models.method import fused_expert_patterns

    model = build_model(setup, seed)
    if setup.method == "lora":
        with fused_expert_patterns():
            model = get_peft_model(model, lora_config(setup, model))
    args = TrainingArguments(output_dir=str(work_dir / "b0"), per_device_train_batch_size=B0_BATCH,
                             gradient_accumulation_steps=setup.b0_accumulation, remove_unused_columns=False,
                             **common_arguments(setup, seed))
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=pad_batch)
    accumulated = f", {setup.b0_accumulation} accumulated per step" if setup.b0_accumulation > 1 else ""
    settings = {"batching": f"padded batches of {B0_BATCH}{accumulated}", "loss": "model's own (full logits)",
                "experts": _experts(model), "optimizer": args.optim}
    return _train_and_measure(trainer, setup, settings, batches_per_step=setup.b0_accumulation)


def run_b1(setup: Setup, samples: list[dict], seed: int, work_dir: Path) -> RecipeRun:
    import importlib.util

    import datasets
    from peft import get_peft_model
    from trl import SFTConfig, SFTTrainer

    from dsft.models.method import fused_expert_patterns

    model = build_model(setup, seed)
    if setup.method == "lora":
        with fused_expert_patterns():
            model = get_peft_model(model, lora_config(setup, model))
    moe = "n_routed_experts" in setup.shape
    liger = _cuda() and importlib.util.find_spec("liger_kernel") is not None and not moe
    args = SFTConfig(output_dir=str(work_dir / "b1"), per_device_train_batch_size=1, max_length=setup.packed_row_tokens,
                     packing=True, packing_strategy="bfd", padding_free=True, use_liger_kernel=liger,
                     dataset_num_proc=None, **common_arguments(setup, seed))
    datasets.disable_progress_bars()
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(samples),
                         processing_class=_tokenizer(setup))
    settings = {"batching": f"TRL bfd packing, padding-free rows of {setup.packed_row_tokens} tokens",
                "loss": "TRL chunked log-probs", "liger": liger, "experts": _experts(model), "optimizer": args.optim}
    return _train_and_measure(trainer, setup, settings)


def run_dsft(setup: Setup, samples: list[dict], seed: int, work_dir: Path) -> RecipeRun:
    from rich.console import Console

    from dsft.config import RunConfig
    from dsft.data.packing import PackedCollator
    from dsft.models.kernels import apply_speed_plan, resolve_speed_plan
    from dsft.models.method import apply_method
    from dsft.train.loop import build_trainer

    config = RunConfig.model_validate({
        "model": {"name_or_path": f"random-init {setup.shape_name}"},
        "data": {"train_files": ["synthetic"], "max_length_tokens": setup.max_tokens},
        "method": {"type": setup.method, **({"lora": {"r": setup.lora_rank, "alpha": 2 * setup.lora_rank}}
                                            if setup.method == "lora" else {})},
        "train": {"max_steps": setup.steps, "batch_size": 1, "learning_rate": LEARNING_RATES[setup.method],
                  "lr_scheduler": "constant", "gradient_checkpointing": setup.gradient_checkpointing,
                  "logging_steps": 1, "seed": seed, "tensorboard": False, "packing": True,
                  "pack_tokens": setup.packed_row_tokens, **dict(setup.dsft_train)},
        "output": {"dir": str(work_dir / "dsft")}})
    model = apply_method(build_model(setup, seed), config.method)
    plan = resolve_speed_plan(config.train, model)
    apply_speed_plan(model, plan)
    (work_dir / "dsft").mkdir(parents=True, exist_ok=True)
    rows = [{**sample, "sample_id": i} for i, sample in enumerate(samples)]
    trainer, guards = build_trainer(config, work_dir / "dsft", model, _tokenizer(setup), rows, [], Console(quiet=True),
                                    PackedCollator(PAD_ID), loss_chunk_tokens=plan.loss_chunk_tokens if plan.chunked_loss else None)
    settings = {"batching": f"dsft bfd packing, padding-free rows of {setup.packed_row_tokens} tokens",
                "speed_plan": plan.line()}
    try:
        return _train_and_measure(trainer, setup, settings)
    finally:
        guards.progress.stop()
        guards.stop_on_signal.restore()


RECIPES = {"B0": run_b0, "B1": run_b1, "dsft": run_dsft}


def common_arguments(setup: Setup, seed: int) -> dict:
    """TrainingArguments fields every recipe shares (dsft's come from its train section with the same values)."""
    cuda = _cuda()
    return {"max_steps": setup.steps, "learning_rate": LEARNING_RATES[setup.method], "lr_scheduler_type": "constant",
            "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": seed, "data_seed": seed,
            "gradient_checkpointing": setup.gradient_checkpointing, "logging_steps": 1, "save_strategy": "no",
            "report_to": [], "disable_tqdm": True, "dataloader_num_workers": 0, "bf16": cuda, "use_cpu": not cuda}


def pad_batch(samples: list[dict]) -> dict:
    """B0's collator: right padding with PAD_ID, attention mask, labels padded with -100."""
    import torch

    width = max(len(s["input_ids"]) for s in samples)
    def padded(key, fill):
        return torch.tensor([s[key] + [fill] * (width - len(s[key])) for s in samples])
    mask = torch.tensor([[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"])) for s in samples])
    return {"input_ids": padded("input_ids", PAD_ID), "attention_mask": mask, "labels": padded("labels", -100)}


def _train_and_measure(trainer, setup: Setup, settings: dict, batches_per_step: int = 1) -> RecipeRun:
    import torch
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # raw log dicts; the bench prints its own lines
    counter = measure.CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    meter = measure.step_meter(setup.warmup_steps)
    trainer.add_callback(meter)
    profiler = profile.step_profiler(setup.warmup_steps + 1) if _profiling.get() else None
    if profiler is not None:
        trainer.add_callback(profiler)
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    measured = measure.measured_steps(trainer.state.log_history, meter.ends_s, counter.batches, setup.warmup_steps,
                                      setup.shape, setup.method, batches_per_step)
    peak = torch.cuda.max_memory_allocated() / 2**30 if _cuda() else None
    return RecipeRun(measured, peak, settings, profile=profiler.summary if profiler is not None else None)


_profiling = contextvars.ContextVar("dsft_bench_profiling", default=False)
"""Set by profiling(): recipes run now profile their measured steps."""


@contextlib.contextmanager
def profiling():
    """Within it, each recipe run profiles its measured steps (RecipeRun.profile)."""
    token = _profiling.set(True)
    try:
        yield
    finally:
        _profiling.reset(token)


def release_memory() -> None:
    """Free what a finished recipe held, so the next one's peak memory is its own."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tokenizer(setup: Setup):
    """A placeholder tokenizer (the data is already token ids): TRL reads its pad and eos ids, the Trainer its pad id
    to count real tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<eos>")),
                                        pad_token="<pad>", eos_token="<eos>")
    tokenizer.model_max_length = setup.max_tokens
    return tokenizer


def _experts(model) -> str | None:
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    return base.config._experts_implementation if type(base)._can_set_experts_implementation() else None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def work_directory():
    """A temporary directory for the recipes' output_dir (nothing is saved there but logs)."""
    with tempfile.TemporaryDirectory(prefix="dsft-bench-") as directory:
        yield Path(directory)
