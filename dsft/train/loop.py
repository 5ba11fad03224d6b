"""The training loop every stage shares: TrainingArguments from the config, DsftTrainer with dsft's callbacks
and guards, resume, clean stops, the atomic save of the final model and the common summary numbers."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from rich.console import Console

from dsft.config import RunConfig, TrainConfig
from dsft.data.dataset import DataStats
from dsft.data.fingerprint import Fingerprint
from dsft.data.hf_templates import JINJA_TEMPLATES
from dsft.data.packing import packed_rows
from dsft.data.read import read_records
from dsft.errors import DsftError, TrainingInterrupted
from dsft.eval.speed import process_peak_memory
from dsft.models.families import model_type_of, refuse_packing
from dsft.models.kernels import optimizer_name, packed_attention, set_attention
from dsft.models.load import BASE_MODEL_DIR
from dsft.models.packed_forward import pack_model
from dsft.train import run_dir as rd
from dsft.train.adapters import adapter_precision, conversion_kwargs, initialise_adapter
from dsft.train.adversarial import build_adversary
from dsft.train.callbacks import METRICS_FILE, MetricsCallback, RichProgressCallback, truncate_log
from dsft.train.checkpoints import newest_good_checkpoint
from dsft.train.distributed import (
    engine_arguments,
    gathered_state_dict,
    is_main,
    main_first,
    mark_moe_leaves,
    world_size,
    write_engine_config,
)
from dsft.train.guards import NonFiniteGuard, StopOnSignal
from dsft.train.moe import collapse_error, setup_moe
from dsft.train.tracking import ended_on_error, start_tracking
from dsft.train.trainer import SAMPLES_FILE, DsftTrainer, SampleLedger
from dsft.train.unfreeze import ProgressiveUnfreezing


def data_fingerprints(data) -> dict[str, str]:
    """sha256 over the canonical records of each training and validation file (as dsft data prepare writes beside
    its outputs), so a run names exactly the data it learned from."""
    fingerprints = {}
    for path in [*data.train_files, *data.validation_files]:
        digest = Fingerprint()
        for record in read_records(path, on_bad_record=lambda error: None):
            digest.update(record.data)
        fingerprints[path] = digest.hexdigest()
    return fingerprints


def track(config: RunConfig, run_dir: Path, console):
    """The stage's MLflow tracker (train/tracking.py) when config.tracking.mlflow is on, else None."""
    fingerprints = data_fingerprints(config.data) if config.tracking.mlflow.enabled else {}
    return start_tracking(config, run_dir, fingerprints, console)


def training_arguments(train: TrainConfig, run_dir: Path, has_validation: bool, args_class=None, **stage_arguments):
    """TrainingArguments from the train section; args_class (a TrainingArguments subclass, e.g. TRL's DPOConfig)
    with stage_arguments (its own fields) for stages that train with a TRL trainer."""
    import torch
    from transformers import TrainingArguments

    precision = train.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    evaluate = has_validation and train.eval_steps is not None
    engine = engine_arguments(train.distributed, train.max_grad_norm)
    write_engine_config(run_dir, train.distributed, engine, precision)
    return (TrainingArguments if args_class is None else args_class)(
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
        optim=optimizer_name(train.fused_optimizer),
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
        **engine,
        **stage_arguments,
    )


TENSORBOARD_DIR = "tensorboard"
"""Where every stage writes its TensorBoard event files, under the run directory."""


@dataclasses.dataclass
class Guards:
    metrics: MetricsCallback
    nonfinite: NonFiniteGuard
    stop_on_signal: StopOnSignal
    progress: RichProgressCallback
    moe: object = None
    """The MoeTraining callback (train/moe.py) of an MoE model, else None."""


def build_trainer(config: RunConfig, run_dir: Path, model, tokenizer, train_rows, validation_rows, console,
                   data_collator, first_callbacks=(), trainer_class=DsftTrainer, args=None, packing="rows",
                   **trainer_kwargs):
    """DsftTrainer with dsft's callbacks and guards, for any stage; trainer_kwargs e.g. compute_loss_func, compute_metrics.

    first_callbacks run before dsft's own, so what they add to a log record reaches metrics.jsonl. trainer_class is a
    DsftTrainer subclass (e.g. one mixed with a TRL trainer), args its arguments; default training_arguments(...).
    With train.packing, packing says how: "rows" groups the training rows into packed rows here (sft), "batches" runs
    each padded batch packed through the model body (dsft.models.packed_forward), "own" leaves it to the stage (dpo)."""
    from transformers import (
        EarlyStoppingCallback,
        PrinterCallback,
    )

    train = config.train
    if train.early_stopping_patience is not None and not validation_rows:
        raise DsftError("train.early_stopping_patience needs validation data (data.validation_files or data.validation_ratio)")
    metrics, ledger, stop_on_signal = MetricsCallback(run_dir, track(config, run_dir, console)), SampleLedger(run_dir), StopOnSignal()
    progress = RichProgressCallback(console, metrics)
    callbacks = [*first_callbacks, metrics, progress, ledger, stop_on_signal]
    if config.method.unfreeze:
        # First: it adds trainable_parameters to the log record that MetricsCallback writes; built before the
        # Trainer, while every parameter that will ever train still requires grad (and so enters the optimizer).
        callbacks.insert(0, ProgressiveUnfreezing(model, config.method.unfreeze, console.print, metrics.write))
    tensorboard = _tensorboard_callback(run_dir) if train.tensorboard else None
    if tensorboard is not None:
        callbacks.append(tensorboard)
    if train.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    args = training_arguments(train, run_dir, bool(validation_rows)) if args is None else args
    refuse_packing(model, train.packing)
    leaves = mark_moe_leaves(model, train.distributed)
    if leaves:
        console.print(f"ZeRO-3: MoE blocks fetched whole ({', '.join(leaves)})")
    if train.packing and packing == "batches":
        pack_batches(model, config, console, "each batch")
    if train.packing and packing == "rows":
        pack_tokens = train.pack_tokens or train.batch_size * config.data.max_length_tokens
        train_rows = packed_rows(train_rows, pack_tokens)
        args.per_device_train_batch_size = 1  # one packed row holds what a padded batch held
        console.print(f"packing: {sum(len(p) for p in train_rows):,} samples in {len(train_rows):,} rows of "
                      f"at most {pack_tokens:,} tokens")
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=validation_rows or None,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        ledger=ledger,
        keep_last_checkpoints=train.keep_last_checkpoints,
        adversary=build_adversary(train.adversarial, model),
        # Several processes: each epoch's samples once over the ranks (every stage built here; TRL's mixes weigh
        # each pair equally in its step, trl_stage.DsftTrlTrainer).
        whole_epochs=True,
        loraplus_lr_ratio=config.method.lora.plus_lr_ratio if config.method.lora_family else None,
        **trainer_kwargs,
    )
    # The rich progress bar replaces transformers' printing of raw log dicts.
    trainer.remove_callback(PrinterCallback)
    adapter_precision(trainer, config)
    initialise_adapter(trainer.model, config, run_dir)
    moe = setup_moe(trainer, config, run_dir, train_rows, console, tensorboard.tb_writer if tensorboard else None)
    fp16 = trainer.args.fp16
    nonfinite = NonFiniteGuard(trainer, train.nonfinite, train.max_consecutive_nonfinite, not fp16, console.print)
    trainer.add_callback(nonfinite)
    if moe is not None:
        moe.nonfinite = nonfinite
    return trainer, Guards(metrics, nonfinite, stop_on_signal, progress, moe)


def pack_batches(model, config: RunConfig, console: Console, what: str, *more_models) -> None:
    """Run each padded batch of model (and more_models) packed through the model body, with the packed-row attention
    kernel where one applies, and say so."""
    refuse_packing(model, config.train.packing)
    for packed in (model, *more_models):
        pack_model(packed)
    console.print(f"packing: {what} runs as one row of its real tokens through the model body "
                  f"({use_packed_attention(config, model, *more_models)})")


def use_packed_attention(config: RunConfig, *models) -> str:
    """Put the packed-row attention kernel (kernels.packed_attention) on models where one applies; returns what was
    chosen, for the log ("attention varlen", "attention unchanged: no CUDA: ...")."""
    import torch

    attention, reason = packed_attention(True, config.model.attn_implementation, torch.cuda.is_available(),
                                         model_type_of(models[0]))
    for model in models if attention is not None else ():
        set_attention(model, attention)
    return f"attention {attention}" if attention is not None else f"attention unchanged: {reason}"


def checkpoint_to_resume(run_dir: Path, console: Console) -> Path:
    root = run_dir / rd.CHECKPOINTS_DIR
    checkpoint = newest_good_checkpoint(root, warn=lambda line: console.print(f"[yellow]warning:[/yellow] {line}"))
    if checkpoint is None:
        raise DsftError(f"--resume: no checkpoint in {root} verifies against its manifest; nothing to resume from")
    console.print(f"resuming from {checkpoint}")
    step = rd.checkpoint_step(checkpoint)
    with main_first():  # the others wait until rank 0 has cut the logs back
        for name in (METRICS_FILE, SAMPLES_FILE) if is_main() else ():
            truncate_log(run_dir / name, step)
        if is_main():
            purge_tensorboard_after(run_dir / TENSORBOARD_DIR, step)
    return checkpoint


def purge_tensorboard_after(log_dir: Path, step: int) -> None:
    """Hide the TensorBoard points an interrupted run wrote after step: the resumed run writes them again.

    TensorBoard's own purge: an event file opened with purge_step marks a restart, and TensorBoard drops the
    earlier files' points from that step on (the event files themselves, like the run's inputs, are not edited)."""
    if not log_dir.is_dir():
        return
    from torch.utils.tensorboard import SummaryWriter

    SummaryWriter(log_dir=str(log_dir), purge_step=step + 1).close()


def train_guarded(trainer, guards: Guards, checkpoint: Path | None, train: TrainConfig, resume_command: str):
    """trainer.train with user-facing errors for out-of-memory and a clean stop on signals."""
    with ended_on_error(guards.metrics.tracker):
        return _train_guarded(trainer, guards, checkpoint, train, resume_command)


def _train_guarded(trainer, guards: Guards, checkpoint: Path | None, train: TrainConfig, resume_command: str):
    import torch

    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError as exc:
        raise DsftError(_out_of_memory_advice(train, str(exc).splitlines()[0])) from None
    finally:
        guards.progress.stop()
        guards.stop_on_signal.restore()
    collapsed = collapse_error(guards.moe, newest_good_checkpoint(Path(trainer.args.output_dir), warn=lambda line: None))
    if collapsed is not None:
        raise collapsed
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

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR)))


def save_model(trainer, tokenizer, run_dir: Path, config: RunConfig) -> None:
    """The final model (or adapter) and tokenizer into run_dir, in the same HF format whatever the engine: a sharded
    engine's full state dict is gathered on every rank, and rank 0 alone writes."""
    state_dict = None
    if world_size() > 1 and config.train.distributed != "ddp":
        state_dict = gathered_state_dict(trainer)  # a collective: all ranks
    with main_first():
        if is_main():
            _save_model(trainer.model, tokenizer, run_dir, config, state_dict)


def _save_model(model, tokenizer, run_dir: Path, config: RunConfig, state_dict: dict | None) -> None:
    if config.method.adapter and config.model.preset is not None:
        # Absolute, so peft.AutoPeftModelForCausalLM.from_pretrained(run_dir) works from any directory.
        adapted = getattr(model, "backbone", model)  # a multitask model adapts its backbone only
        adapted.peft_config["default"].base_model_name_or_path = str((run_dir / BASE_MODEL_DIR).resolve())
    if config.data.chat_template in JINJA_TEMPLATES:
        # So plain transformers' apply_chat_template renders the prompts this run trained on.
        tokenizer.chat_template = JINJA_TEMPLATES[config.data.chat_template]
    # Written aside, then each file renamed into place: a crash never leaves a half-written weight file.
    staging = run_dir / ".staging-final"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        # Only a sharded engine passes the gathered state dict (the multitask module takes no such argument).
        gathered = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(staging, safe_serialization=True, **gathered, **conversion_kwargs(config, run_dir))
        tokenizer.save_pretrained(staging)
        for path in sorted(staging.iterdir()):
            os.replace(path, run_dir / path.name)
        staging.rmdir()
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DsftError(f"cannot write the trained model into {run_dir}: {exc}; the checkpoints are untouched") from None


def run_summary(config, train_output, eval_loss, stats: DataStats, counts, started_s, trainer) -> dict:
    """The numbers every stage writes into summary.json."""
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
        "peak_memory": process_peak_memory(),
        "trainable_parameters": counts.trainable,
        "packing": config.train.packing,
        "unfreeze": [entry.model_dump() for entry in config.method.unfreeze] or None,
        "adversarial": config.train.adversarial.model_dump() if config.train.adversarial.method != "none" else None,
        "total_parameters": counts.total,
        "weight_memory_bytes": _weight_bytes(trainer.model),
        "quantization": _quantization(config, trainer.model),
        "moe": trainer.moe_training.summary() if getattr(trainer, "moe_training", None) is not None else None,
        "data": dataclasses.asdict(stats),
    }


def _weight_bytes(model) -> int:
    """Bytes the model's weights and buffers hold (a quantized base in its packed form), adapters included."""
    footprint = getattr(model, "get_memory_footprint", None)
    if footprint is not None:
        return int(footprint())
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _quantization(config, model) -> dict | None:
    """method.qlora's settings and what the base holds (models/quantize.py), for qlora runs."""
    if config.method.type != "qlora":
        return None
    from dsft.models.quantize import quantization_report

    return {**config.method.qlora.model_dump(), **quantization_report(model)}


def format_number(value) -> str:
    if isinstance(value, float) and abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)

