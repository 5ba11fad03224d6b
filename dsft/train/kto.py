"""Kahneman-Tversky optimization (KTO), top to bottom: config -> tokenizer -> labelled answers -> policy and
reference -> trainer -> run directory.

KTO learns from answers labelled desirable or undesirable one by one, without pairs (data/kto_data.py). TRL's
KTOTrainer computes the loss (kto.loss kto or apo_zero_unpaired, with kto.beta and the desirable and undesirable
weights): each answer's summed log-ratio to the reference, compared (kto) with the KL estimate from mismatched
answers. The reference is the starting model, as in DPO: with LoRA the policy with its adapter disabled, with
full or freeze a frozen copy, or kto.reference. Rows render as SFT renders them; TRL logs rewards/chosen,
rewards/rejected, kl and the log-probabilities per step, which reach metrics.jsonl and summary.json. The run
directory is a plain causal LM (or an adapter), as SFT's; start from an SFT run as DPO does.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

from rich.console import Console
from trl import KTOConfig, KTOTrainer
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

from dsft.config import RunConfig
from dsft.data.chat import resolve_template
from dsft.data.columns import FieldMap
from dsft.data.dataset import DataStats, load_validated
from dsft.data.kto_data import build_kto_datasets, labelled_texts, to_labelled
from dsft.errors import DsftError
from dsft.models.kernels import enable_checkpointing
from dsft.models.method import apply_method, count_parameters
from dsft.train import run_dir as rd
from dsft.train.loop import (
    checkpoint_to_resume,
    data_fingerprints,
    run_summary,
    save_model,
    train_guarded,
)
from dsft.train.trl_stage import (
    DsftTrlTrainer,
    WithSampleIds,
    build_reference_trainer,
    check_stage_config,
    checkpointing_mode,
    data_lines,
    reference_description,
    reference_model,
    router_aux_loss_coef,
    trl_arguments,
)

LOGGED = ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "logps/chosen", "logps/rejected")
"""What TRL's KTOTrainer logs that summary.json reports (first and last training log, and validation)."""


@dataclasses.dataclass
class KtoResult:
    run_dir: Path
    summary: dict
    model: object
    tokenizer: object


class UnpairedPreferenceTrainer(DsftTrlTrainer, KTOTrainer):
    """TRL's KTOTrainer with dsft's staged checkpoints, sample ledger and guards."""


def run_kto(config: RunConfig, resume: bool = False, console: Console | None = None,
            resume_command: str = "dsft train CONFIG --resume") -> KtoResult:
    """Train a policy on labelled answers with KTO as the config says and write the run directory.

    Raises DsftError for bad input (naming file:line for a bad record), TrainingInterrupted after a signal and
    TrainingDiverged on a non-finite loss or gradient, as run_sft does.
    """
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    console = console or Console(soft_wrap=True)
    hf_logging.disable_progress_bar()
    started_s = time.perf_counter()
    check_stage_config(config)
    if config.train.packing:
        raise DsftError("train.packing is not supported by stage kto; remove it from the config")
    run_dir = rd.prepare_run_dir(config.output, resume)
    console.print(f"run directory: {run_dir}")

    # Setup: tokenizer, then the answers rendered with the template that generation uses.
    set_seed(config.train.seed)
    tokenizer = rd.run_tokenizer(config.model, run_dir, lambda: _texts(config))
    template = resolve_template(config.data.chat_template, tokenizer)
    config = config.model_copy(update={"data": config.data.model_copy(update={"chat_template": template})})
    rd.save_config(config, run_dir)
    train_rows, validation_rows, stats = build_kto_datasets(config.data, template, tokenizer, config.train.seed,
                                                            config.train.batch_size)
    desirable = sum(row["label"] for row in train_rows)
    for line in [*data_lines(stats), f"{desirable} desirable and {len(train_rows) - desirable} undesirable answers"]:
        line = line.replace("pairs:", "answers:").replace("no differing answer token", "no answer token")
        console.print(f"data: {line}")

    # Policy and reference (copied before training, so the reference is the starting model).
    policy = rd.start_model(config, tokenizer, run_dir, console)
    reference = reference_model(config, policy, tokenizer, config.kto.reference)
    console.print(f"reference: {reference_description(config, config.kto.reference)}")
    if config.method.type == "freeze":
        policy = apply_method(policy, config.method)
    enable_checkpointing(policy, checkpointing_mode(config))

    # Train.
    trainer, guards = build_kto_trainer(config, run_dir, policy, reference, tokenizer, train_rows, validation_rows,
                                        console)
    counts = count_parameters(trainer.model)
    console.print(f"method {config.method.type}: {counts.line()}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        checkpoint = checkpoint_to_resume(run_dir, console) if resume else None
        train_output = train_guarded(trainer, guards, checkpoint, config.train, resume_command)
        after = trainer.evaluate() if validation_rows else {}

    # Save: adapter or full model, tokenizer, then the numbers.
    save_model(trainer, tokenizer, run_dir, config)
    summary = run_summary(config, train_output, after.get("eval_loss"), stats, counts, started_s, trainer)
    summary.update(_kto_numbers(config, after, trainer.state.log_history, desirable, len(train_rows)))
    summary["nonfinite_skipped_steps"] = guards.nonfinite.skipped_steps
    summary["data_fingerprints"] = data_fingerprints(config.data)
    summary["batch_size_used"] = trainer.state.train_batch_size
    rd.write_summary(run_dir, summary, guards.metrics.tracker)
    console.print(f"saved to {run_dir}")
    return KtoResult(run_dir, summary, trainer.model, tokenizer)


def _texts(config: RunConfig):
    data = config.data
    answers = load_validated(data.train_files, lambda record: to_labelled(record, data.system_prompt),
                             data.on_error, DataStats(), data.max_samples, FieldMap.of(data))
    yield from labelled_texts(answers)


def build_kto_trainer(config: RunConfig, run_dir: Path, policy, reference, tokenizer, train_rows: list[dict],
                      validation_rows: list[dict], console: Console):
    """(UnpairedPreferenceTrainer, Guards) for the policy (not yet wrapped: with LoRA, TRL wraps it with dsft's
    LoRA config and disables that adapter for the reference pass) and the reference (None: that policy)."""
    k = config.kto
    args = trl_arguments(config, run_dir, bool(validation_rows), KTOConfig, beta=k.beta, loss_type=k.loss,
                         desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight,
                         router_aux_loss_coef=router_aux_loss_coef(policy))
    collator = WithSampleIds(DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id))
    trainer, guards = build_reference_trainer(config, run_dir, policy, reference, tokenizer, train_rows,
                                              validation_rows, console, collator, UnpairedPreferenceTrainer, args)
    guards.progress.status_keys = {"rewards/margins": "margin", "kl": "kl"}
    return trainer, guards


def _kto_numbers(config: RunConfig, after: dict, log_history: list[dict], desirable: int, rows: int) -> dict:
    """summary.json entries: the KTO settings and label counts; TRL's logged rewards, KL and log-probabilities at
    the first and last training log and on validation."""
    train_logs = [record for record in log_history if "loss" in record and "kl" in record]
    first, last = (train_logs[0], train_logs[-1]) if train_logs else ({}, {})
    numbers = {"kto": {**config.kto.model_dump(), "reference": reference_description(config, config.kto.reference),
                       "desirable_answers": desirable, "undesirable_answers": rows - desirable}}
    for key in LOGGED:
        name = key.replace("/", "_")
        numbers[f"eval_{name}"] = after.get(f"eval_{key}")
        numbers[f"train_{name}_first_log"] = first.get(key)
        numbers[f"train_{name}_last_log"] = last.get(key)
    return numbers
