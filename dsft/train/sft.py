"""Supervised fine-tuning, top to bottom: config -> tokenizer -> data -> model -> trainer -> run directory.

The loop is transformers' Trainer; dsft supplies the rendered data (assistant-only labels),
the method (full, LoRA, freeze), callbacks for metrics.jsonl, TensorBoard and progress, and
the run directory that loads with plain transformers / peft.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dsft.config import EvalConfig, RunConfig, TrainConfig
from dsft.data.chat import resolve_template
from dsft.data.dataset import DataStats, build_sft_datasets, load_examples
from dsft.data.fingerprint import Fingerprint
from dsft.data.hf_templates import JINJA_TEMPLATES
from dsft.data.packing import PackedCollator, packed_rows
from dsft.data.read import read_records
from dsft.errors import DsftError, TrainingInterrupted
from dsft.eval.exact_match import ExactMatchResult, score_exact_match
from dsft.eval.in_training import EvalMetricsCallback
from dsft.models.load import BASE_MODEL_DIR, build_model, build_tokenizer
from dsft.models.method import apply_method, count_parameters
from dsft.serve.generate import DecodeSettings
from dsft.train import run_dir as rd
from dsft.train.callbacks import (
    METRICS_FILE,
    MetricsCallback,
    RichProgressCallback,
    truncate_log,
)
from dsft.train.checkpoints import newest_good_checkpoint
from dsft.train.guards import NonFiniteGuard, StopOnSignal
from dsft.train.trainer import SAMPLES_FILE, DsftTrainer, SampleLedger


@dataclasses.dataclass
class SftResult:
    run_dir: Path
    summary: dict
    model: object
    """The trained model in memory (a PeftModel for LoRA)."""
    tokenizer: object


def run_sft(
    config: RunConfig, resume: bool = False, console: Console | None = None, resume_command: str = "dsft train CONFIG --resume"
) -> SftResult:
    """Fine-tune as the config says and write the run directory.

    Raises DsftError for bad input, TrainingInterrupted after a signal (a checkpoint was saved;
    the message shows resume_command) and TrainingDiverged on a non-finite loss or gradient.
    """
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    console = console or Console(soft_wrap=True)  # log lines stay whole when piped to a file
    hf_logging.disable_progress_bar()  # dsft draws its own progress; shard-writing bars are noise
    started_s = time.perf_counter()
    run_dir = rd.prepare_run_dir(config.output, resume)
    console.print(f"run directory: {run_dir}")

    # Setup: tokenizer (trained on the data for a preset), then data rendered with the template
    # that generation will use too; the resolved template is saved so `dsft generate` agrees.
    set_seed(config.train.seed)
    tokenizer = build_tokenizer(config.model, run_dir, lambda: _training_texts(config))
    template = resolve_template(config.data.chat_template, tokenizer)
    config = config.model_copy(update={"data": config.data.model_copy(update={"chat_template": template})})
    rd.save_config(config, run_dir)
    train_rows, validation_rows, stats = build_sft_datasets(config.data, tokenizer, config.train.seed)
    for sample_id, row in enumerate(train_rows):
        row["sample_id"] = sample_id  # for the ledger of consumed samples (samples.jsonl)
    for line in stats.lines():
        console.print(f"data: {line}")
    eval_examples = _generation_examples(config, console)

    # Model and method.
    model = build_model(config.model, tokenizer, config.train.seed)
    if config.model.preset is not None and config.method.type == "lora":
        # A preset exists nowhere else: keep its base weights so the adapter can be loaded.
        model.save_pretrained(run_dir / BASE_MODEL_DIR)
    model = apply_method(model, config.method)
    counts = count_parameters(model)
    console.print(f"method {config.method.type}: {counts.line()}")
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()

    # Train (the Trainer puts the model on its device, so the score before training runs there too).
    trainer, guards = _build_trainer(config, run_dir, model, tokenizer, train_rows, validation_rows, console)
    if validation_rows:
        trainer.add_callback(EvalMetricsCallback(tokenizer, template, validation_rows, _with_references(eval_examples),
                                                 config.eval, guards.metrics.write))
    before = _score(model, tokenizer, eval_examples, template, config.eval, console, "before training")
    checkpoint = _checkpoint_to_resume(run_dir, console) if resume else None
    train_output = _train(trainer, guards, checkpoint, config.train, resume_command)
    eval_loss = trainer.evaluate()["eval_loss"] if validation_rows else None

    # Save: adapter or full model, tokenizer, then the numbers.
    _save_model(trainer, tokenizer, run_dir, config)
    after = _score(model, tokenizer, eval_examples, template, config.eval, console, "after training")
    summary = _summary(config, train_output, eval_loss, stats, counts, before, after, started_s, trainer)
    summary["nonfinite_skipped_steps"] = guards.nonfinite.skipped_steps
    summary["data_fingerprints"] = _data_fingerprints(config.data)
    summary["batch_size_used"] = trainer.state.train_batch_size  # smaller than configured after auto_find_batch_size
    rd.write_summary(run_dir, summary)
    _print_summary(console, summary, run_dir)
    return SftResult(run_dir, summary, trainer.model, tokenizer)


def _training_texts(config: RunConfig):
    """Every string of the training data, for training a preset's tokenizer."""
    data = config.data
    for example in load_examples(data.train_files, data.format, data.on_error, DataStats(), data.system_prompt, data.max_samples):
        if example.text is not None:
            yield example.text
        for message in example.messages:
            yield message.content
            if message.reasoning:
                yield message.reasoning


def _generation_examples(config: RunConfig, console: Console) -> list:
    if not config.eval.generate_files:
        return []
    stats = DataStats()
    examples = load_examples(config.eval.generate_files, config.data.format, config.data.on_error, stats, config.data.system_prompt)
    if stats.skipped_bad:
        console.print(f"eval data: skipped {stats.skipped_bad} bad records")
    return examples[: config.eval.max_samples] if config.eval.max_samples else examples


def _data_fingerprints(data) -> dict[str, str]:
    """sha256 over the canonical records of each training and validation file (as dsft data prepare writes beside
    its outputs), so a run names exactly the data it learned from."""
    fingerprints = {}
    for path in [*data.train_files, *data.validation_files]:
        digest = Fingerprint()
        for record in read_records(path, on_bad_record=lambda error: None):
            digest.update(record.data)
        fingerprints[path] = digest.hexdigest()
    return fingerprints


def _with_references(examples: list) -> list:
    return [e for e in examples if e.messages and e.messages[-1].role == "assistant"]


def _score(model, tokenizer, examples, template, eval_config: EvalConfig, console, when: str) -> ExactMatchResult | None:
    if not examples or (when == "before training" and not eval_config.before_training):
        return None
    settings = DecodeSettings(max_new_tokens=eval_config.max_new_tokens)
    result = score_exact_match(model, tokenizer, examples, template, settings, eval_config.batch_size)
    console.print(f"exact match {when}: {result.accuracy:.3f} on {result.count} held-out prompts")
    return result


def _training_arguments(train: TrainConfig, run_dir: Path, has_validation: bool):
    import torch
    from transformers import TrainingArguments

    precision = train.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    evaluate = has_validation and train.eval_steps is not None
    return TrainingArguments(
        output_dir=str(run_dir / rd.CHECKPOINTS_DIR),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum_steps,
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps if train.max_steps is not None else -1,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.lr_warmup_steps or train.lr_warmup_ratio,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        max_grad_norm=train.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=train.eval_steps if evaluate else None,
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        save_total_limit=None,  # DsftTrainer rotates: it never deletes the only good checkpoint
        auto_find_batch_size=train.auto_find_batch_size,
        load_best_model_at_end=train.early_stopping_patience is not None and evaluate,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        remove_unused_columns=False,  # keeps sample_id for the ledger; DsftTrainer pops it before the model
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


@dataclasses.dataclass
class _Guards:
    metrics: MetricsCallback
    nonfinite: NonFiniteGuard
    stop_on_signal: StopOnSignal
    progress: RichProgressCallback


def _build_trainer(config: RunConfig, run_dir: Path, model, tokenizer, train_rows, validation_rows, console,
                   data_collator=None, **trainer_kwargs):
    """DsftTrainer with dsft's callbacks and guards; data_collator (default: padding or packing for SFT) and
    trainer_kwargs (e.g. compute_loss_func, compute_metrics) let another stage reuse it."""
    from transformers import (
        EarlyStoppingCallback,
        PrinterCallback,
    )

    train = config.train
    if train.early_stopping_patience is not None and not validation_rows:
        raise DsftError("train.early_stopping_patience needs validation data (data.validation_files or data.validation_ratio)")
    metrics, ledger, stop_on_signal = MetricsCallback(run_dir), SampleLedger(run_dir), StopOnSignal()
    progress = RichProgressCallback(console, metrics)
    callbacks = [metrics, progress, ledger, stop_on_signal]
    if train.tensorboard:
        callbacks.append(_tensorboard_callback(run_dir))
    if train.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    args = _training_arguments(train, run_dir, bool(validation_rows))
    if train.packing:
        pack_tokens = train.pack_tokens or train.batch_size * config.data.max_length_tokens
        train_rows = packed_rows(train_rows, pack_tokens)
        args.per_device_train_batch_size = 1  # one packed row holds what a padded batch held
        console.print(f"packing: {sum(len(p) for p in train_rows):,} samples in {len(train_rows):,} rows of "
                      f"at most {pack_tokens:,} tokens")
    trainer = DsftTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=validation_rows or None,
        data_collator=_Collator(tokenizer) if data_collator is None else data_collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        ledger=ledger,
        keep_last_checkpoints=train.keep_last_checkpoints,
        **trainer_kwargs,
    )
    # The rich progress bar replaces transformers' printing of raw log dicts.
    trainer.remove_callback(PrinterCallback)
    fp16 = trainer.args.fp16
    nonfinite = NonFiniteGuard(trainer, train.nonfinite, train.max_consecutive_nonfinite, not fp16, console.print)
    trainer.add_callback(nonfinite)
    return trainer, _Guards(metrics, nonfinite, stop_on_signal, progress)


class _Collator:
    """Packs (lists of samples) become padding-free rows; plain samples are padded, labels with -100."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        self.padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        self.packed = PackedCollator(tokenizer.pad_token_id)

    def __call__(self, features):
        return self.packed(features) if isinstance(features[0], list) else self.padded(features)


def _checkpoint_to_resume(run_dir: Path, console: Console) -> Path:
    root = run_dir / rd.CHECKPOINTS_DIR
    checkpoint = newest_good_checkpoint(root, warn=lambda line: console.print(f"[yellow]warning:[/yellow] {line}"))
    if checkpoint is None:
        raise DsftError(f"--resume: no checkpoint in {root} verifies against its manifest; nothing to resume from")
    console.print(f"resuming from {checkpoint}")
    step = rd.checkpoint_step(checkpoint)
    for name in (METRICS_FILE, SAMPLES_FILE):
        truncate_log(run_dir / name, step)
    return checkpoint


def _train(trainer, guards: _Guards, checkpoint: Path | None, train: TrainConfig, resume_command: str):
    """trainer.train with user-facing errors for out-of-memory and a clean stop on signals."""
    import torch

    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError as exc:
        raise DsftError(_out_of_memory_advice(train, str(exc).splitlines()[0])) from None
    finally:
        guards.progress.stop()
        guards.stop_on_signal.restore()
    if guards.stop_on_signal.signal_name is not None:
        saved = newest_good_checkpoint(Path(trainer.args.output_dir), warn=lambda line: None)
        raise TrainingInterrupted(
            f"stopped by {guards.stop_on_signal.signal_name} at step {trainer.state.global_step}; "
            f"checkpoint saved in {saved}. Resume with: {resume_command}"
        )
    return output


def _out_of_memory_advice(train: TrainConfig, detail: str) -> str:
    return (
        f"out of GPU memory ({detail}). Lower train.batch_size (now {train.batch_size}) and raise "
        "train.grad_accum_steps to keep the effective batch, lower data.max_length_tokens, set "
        "train.gradient_checkpointing: true, use method.type: lora instead of full, or set "
        "train.auto_find_batch_size: true to halve the batch size until it fits"
    )


def _tensorboard_callback(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tensorboard")))


def _save_model(trainer, tokenizer, run_dir: Path, config: RunConfig) -> None:
    model = trainer.model
    if config.method.type == "lora" and config.model.preset is not None:
        # Absolute, so peft.AutoPeftModelForCausalLM.from_pretrained(run_dir) works from any directory.
        model.peft_config["default"].base_model_name_or_path = str((run_dir / BASE_MODEL_DIR).resolve())
    if config.data.chat_template in JINJA_TEMPLATES:
        # So plain transformers' apply_chat_template renders the prompts this run trained on.
        tokenizer.chat_template = JINJA_TEMPLATES[config.data.chat_template]
    # Written aside, then each file renamed into place: a crash never leaves a half-written weight file.
    staging = run_dir / ".staging-final"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for path in sorted(staging.iterdir()):
            os.replace(path, run_dir / path.name)
        staging.rmdir()
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DsftError(f"cannot write the trained model into {run_dir}: {exc}; the checkpoints are untouched") from None


def _summary(config, train_output, eval_loss, stats: DataStats, counts, before, after, started_s, trainer) -> dict:
    history = [r for r in trainer.state.log_history if "loss" in r]
    runtime_s = train_output.metrics.get("train_runtime", 0.0)
    tokens = trainer.state.num_input_tokens_seen
    return {
        "stage": config.stage,
        "method": config.method.type,
        "steps": trainer.state.global_step,
        "final_train_loss": history[-1]["loss"] if history else None,
        "mean_train_loss": train_output.training_loss,
        "final_eval_loss": eval_loss,
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / runtime_s, 1) if runtime_s else None,
        "train_runtime_s": round(runtime_s, 2),
        "wall_time_s": round(time.perf_counter() - started_s, 2),
        "peak_memory": rd.peak_memory_bytes(),
        "trainable_parameters": counts.trainable,
        "total_parameters": counts.total,
        "data": dataclasses.asdict(stats),
        "exact_match_before": before.accuracy if before else None,
        "exact_match_after": after.accuracy if after else None,
        "exact_match_samples": after.samples if after else [],
    }


def _format_number(value) -> str:
    if isinstance(value, float) and abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_summary(console: Console, summary: dict, run_dir: Path) -> None:
    table = Table(title=f"dsft run {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("steps", "final_train_loss", "final_eval_loss", "tokens_per_second", "wall_time_s",
                "exact_match_before", "exact_match_after"):
        value = summary[key]
        if value is not None:
            table.add_row(key, _format_number(value))
    console.print(table)
