"""Reward model, top to bottom: config -> tokenizer -> preference pairs -> one-output classifier -> trainer -> run dir.

The model is the backbone with transformers' *ForSequenceClassification head (one output, read at the last
token that is not padding), trained by TRL's RewardTrainer with the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected) (plus TRL's centring penalty with reward.center_rewards_coefficient).
Pairs render as SFT renders them (preference_data.py). Each evaluation logs the pairwise accuracy on the
validation pairs (eval_pairwise_accuracy: the share whose chosen answer scores higher, counted pair by pair),
before and after training in summary.json. The run directory loads as a reward function:
dsft.models.reward.load_reward_model(run_dir).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from dsft.config import RunConfig
from dsft.data.chat import resolve_template
from dsft.data.preference_data import build_preference_datasets, full_sequences
from dsft.errors import DsftError
from dsft.models.kernels import enable_checkpointing
from dsft.models.method import apply_method, count_parameters
from dsft.train import run_dir as rd
from dsft.train.loop import (
    build_trainer,
    checkpoint_to_resume,
    data_fingerprints,
    format_number,
    run_summary,
    save_model,
    train_guarded,
)
from dsft.train.trl_stage import (
    DsftTrlTrainer,
    WithSampleIds,
    as_dataset,
    check_stage_config,
    checkpointing_mode,
    data_lines,
    training_texts,
    trl_arguments,
)

REWARD_LABEL = "reward"
"""The name of the classifier's single output (config.json id2label)."""


@dataclasses.dataclass
class RewardResult:
    run_dir: Path
    summary: dict
    model: object
    """The trained reward model in memory (a PeftModel for LoRA)."""
    tokenizer: object


class RewardModelTrainer(DsftTrlTrainer, RewardTrainer):
    """TRL's RewardTrainer with dsft's checkpoints and guards, counting correctly ordered validation pairs.

    TRL's own eval_accuracy averages per-batch accuracies; eval_pairwise_accuracy counts pairs, so a short
    last batch weighs what its pairs weigh.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs_ordered = 0
        self.pairs_scored = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if not model.training:
            # The collator stacks the chosen sequences, then the rejected ones.
            chosen_B, rejected_B = outputs.logits.squeeze(-1).chunk(2)
            self.pairs_ordered += int((chosen_B > rejected_B).sum())
            self.pairs_scored += chosen_B.numel()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "eval_loss" in logs and self.pairs_scored:
            logs["eval_pairwise_accuracy"] = self.pairs_ordered / self.pairs_scored
            self.pairs_ordered = self.pairs_scored = 0
        super().log(logs, start_time)


def run_reward(
    config: RunConfig, resume: bool = False, console: Console | None = None, resume_command: str = "dsft train CONFIG --resume"
) -> RewardResult:
    """Train a reward model on preference pairs as the config says and write the run directory.

    Raises DsftError for bad input (naming file:line for a bad record), TrainingInterrupted after a signal
    and TrainingDiverged on a non-finite loss or gradient, as run_sft does.
    """
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    console = console or Console(soft_wrap=True)
    hf_logging.disable_progress_bar()
    started_s = time.perf_counter()
    check_stage_config(config)
    if config.eval.generate_files:
        raise DsftError("eval.generate_files: a reward model scores answers and generates none; score the pairs with "
                        "data.validation_files (pairwise accuracy) instead")
    run_dir = rd.prepare_run_dir(config.output, resume)
    console.print(f"run directory: {run_dir}")

    # Setup: tokenizer, then the pairs rendered with the template that generation uses.
    set_seed(config.train.seed)
    tokenizer = rd.run_tokenizer(config.model, run_dir, lambda: training_texts(config))
    template = resolve_template(config.data.chat_template, tokenizer)
    config = config.model_copy(update={"data": config.data.model_copy(update={"chat_template": template})})
    rd.save_config(config, run_dir)
    train_rows, validation_rows, stats = build_preference_datasets(config.data, template, tokenizer, config.train.seed)
    for line in data_lines(stats):
        console.print(f"data: {line}")

    # Model: one output on the last token; with LoRA the new head trains in full (modules_to_save).
    model = rd.start_model(config, tokenizer, run_dir, console, [REWARD_LABEL], "classification")
    model = apply_method(model, config.method, "SEQ_CLS")
    enable_checkpointing(model, checkpointing_mode(config))
    counts = count_parameters(model)
    console.print(f"method {config.method.type}: {counts.line()}")

    # Train.
    args = trl_arguments(config, run_dir, bool(validation_rows), RewardConfig,
                         center_rewards_coefficient=config.reward.center_rewards_coefficient)
    validation = as_dataset([full_sequences(row) for row in validation_rows], False) if validation_rows else []
    trainer, guards = build_trainer(
        config, run_dir, model, tokenizer, as_dataset([full_sequences(row) for row in train_rows], True), validation,
        console, WithSampleIds(DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)),
        trainer_class=RewardModelTrainer, args=args, packing="batches",
    )
    guards.progress.status_keys = {"accuracy": "acc", "margin": "margin", "pairwise_accuracy": "pairwise acc"}
    before = _evaluate(trainer, validation, console, "before training") if config.eval.before_training and not resume else None
    checkpoint = checkpoint_to_resume(run_dir, console) if resume else None
    train_output = train_guarded(trainer, guards, checkpoint, config.train, resume_command)
    after = _evaluate(trainer, validation, console, "after training")

    # Save: adapter or full model (config.json beside a LoRA adapter holds the one-output head), then the numbers.
    save_model(trainer, tokenizer, run_dir, config)
    if config.method.adapter:
        trainer.model.get_base_model().config.save_pretrained(run_dir)
    summary = run_summary(config, train_output, after.get("eval_loss"), stats, counts, started_s, trainer)
    summary.update(_reward_numbers(before, after, trainer))
    summary["nonfinite_skipped_steps"] = guards.nonfinite.skipped_steps
    summary["data_fingerprints"] = data_fingerprints(config.data)
    summary["batch_size_used"] = trainer.state.train_batch_size
    rd.write_summary(run_dir, summary, guards.metrics.tracker)
    _print_summary(console, summary, run_dir)
    return RewardResult(run_dir, summary, trainer.model, tokenizer)


def _evaluate(trainer, validation, console: Console, when: str) -> dict:
    """The trainer's evaluation on the validation pairs (also in metrics.jsonl); {} without validation data."""
    if not validation:
        return {}
    metrics = trainer.evaluate()
    console.print(f"pairwise accuracy {when}: {metrics['eval_pairwise_accuracy']:.3f} on {len(validation)} validation pairs")
    return metrics


def _reward_numbers(before: dict | None, after: dict, trainer) -> dict:
    """summary.json entries: pairwise accuracy and reward margin on validation, before and after; the last training log."""
    last_train = next((r for r in reversed(trainer.state.log_history) if "margin" in r and "loss" in r), {})
    return {
        "pairwise_accuracy": after.get("eval_pairwise_accuracy"),
        "pairwise_accuracy_before": before.get("eval_pairwise_accuracy") if before else None,
        "eval_margin": after.get("eval_margin"),
        "eval_margin_before": before.get("eval_margin") if before else None,
        "eval_mean_reward": after.get("eval_mean_reward"),
        "train_accuracy_last_log": last_train.get("accuracy"),
        "train_margin_last_log": last_train.get("margin"),
        "reward_label": REWARD_LABEL,
    }


def _print_summary(console: Console, summary: dict, run_dir: Path) -> None:
    table = Table(title=f"dsft run {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("steps", "final_train_loss", "final_eval_loss", "pairwise_accuracy_before", "pairwise_accuracy",
                "eval_margin", "wall_time_s"):
        if summary[key] is not None:
            table.add_row(key, format_number(summary[key]))
    console.print(table)
