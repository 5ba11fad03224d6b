"""Direct preference optimization, top to bottom: config -> tokenizer -> pairs -> policy and reference -> trainer
-> run directory.

TRL's DPOTrainer computes the loss (dpo.loss: its DPO-family losses, with dpo.beta and dpo.label_smoothing) from
the summed log-probabilities of each answer's tokens under the policy and the reference; simpo and orpo use no
reference and train through reference_free.py (LoRA wrapped by dsft, no reference pass). The reference is:
- with LoRA, the policy with its adapter disabled: TRL wraps the model with dsft's LoRA config itself and, given
  no reference model, runs the reference pass with the adapter switched off, so no second copy of the weights
  exists (a model handed over already wrapped would get a copied "ref" adapter instead);
- with full or freeze, a frozen copy of the starting model, made in memory before training;
- dpo.reference when set (any method): that model, which must share the policy's tokenizer.
Pairs render as SFT renders them (preference_data.py). TRL logs rewards/chosen and rewards/rejected (beta x the
answer's log-ratio to the reference), rewards/margins and rewards/accuracies at each logging step (eval_ ones at
each evaluation); they reach metrics.jsonl and the progress bar. With eval.generate_files, greedy answers are
scored by exact match before and after training, as SFT does. The run directory is a plain causal LM (or an
adapter), as SFT's.

Starting from an SFT run: model.name_or_path names a full fine-tuning run directory as is (it is a Hugging Face
model directory). A LoRA run directory holds an adapter: merge it first, or train SFT and DPO as two stages of
one config (stages), which hands the merged model over.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from dsft.config import RunConfig
from dsft.data.chat import resolve_template
from dsft.data.columns import FieldMap
from dsft.data.dataset import DataStats, load_examples
from dsft.data.preference_data import build_preference_datasets
from dsft.eval.exact_match import score_exact_match
from dsft.models.generate import DecodeSettings
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
    training_arguments,
    use_packed_attention,
)
from dsft.train.packed_pairs import pack_trainer_forwards
from dsft.train.reference_free import REFERENCE_FREE_LOSSES, ReferenceFreeTrainer
from dsft.train.trl_stage import (
    DsftTrlTrainer,
    WithSampleIds,
    as_dataset,
    build_reference_trainer,
    check_stage_config,
    checkpointing_mode,
    data_lines,
    reference_description,
    reference_model,
    router_aux_loss_coef,
    training_texts,
    trl_arguments,
)

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")
"""What TRL's DPOTrainer logs per step (and with eval_ per evaluation) that summary.json reports."""


@dataclasses.dataclass
class DpoResult:
    run_dir: Path
    summary: dict
    model: object
    """The trained policy in memory (a PeftModel for LoRA)."""
    tokenizer: object


class PreferenceTrainer(DsftTrlTrainer, DPOTrainer):
    """TRL's DPOTrainer with dsft's staged checkpoints, sample ledger and guards."""


def run_dpo(
    config: RunConfig, resume: bool = False, console: Console | None = None, resume_command: str = "dsft train CONFIG --resume"
) -> DpoResult:
    """Train a policy on preference pairs with DPO as the config says and write the run directory.

    Raises DsftError for bad input (naming file:line for a bad record), TrainingInterrupted after a signal
    and TrainingDiverged on a non-finite loss or gradient, as run_sft does.
    """
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    console = console or Console(soft_wrap=True)
    hf_logging.disable_progress_bar()
    started_s = time.perf_counter()
    check_stage_config(config)
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

    # Policy and reference (copied before training, so the reference is the starting model).
    policy = rd.start_model(config, tokenizer, run_dir, console)
    reference = build_reference(config, policy, tokenizer)
    console.print(f"reference: {describe_reference(config)}")
    if config.method.type == "freeze" or (config.dpo.loss in REFERENCE_FREE_LOSSES and config.method.adapter):
        policy = apply_method(policy, config.method)  # TRL's DPOTrainer wraps LoRA itself; the losses without one do not
    enable_checkpointing(policy, checkpointing_mode(config))

    # Train.
    trainer, guards = build_dpo_trainer(config, run_dir, policy, reference, tokenizer, train_rows, validation_rows, console)
    counts = count_parameters(trainer.model)
    console.print(f"method {config.method.type}: {counts.line()}")
    evaluate_before = config.eval.before_training and not resume
    with warnings.catch_warnings():
        # TRL's reference pass asks transformers for is_gradient_checkpointing, deprecated there: noise to the user.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        before = _evaluate(trainer, console, "before training") if evaluate_before and validation_rows else {}
        exact_before = _exact_match(trainer.model, tokenizer, config, console, "before training") if evaluate_before else None
        checkpoint = checkpoint_to_resume(run_dir, console) if resume else None
        train_output = train_guarded(trainer, guards, checkpoint, config.train, resume_command)
        after = _evaluate(trainer, console, "after training") if validation_rows else {}
    exact_after = _exact_match(trainer.model, tokenizer, config, console, "after training")

    # Save: adapter or full model, tokenizer, then the numbers.
    save_model(trainer, tokenizer, run_dir, config)
    summary = run_summary(config, train_output, after.get("eval_loss"), stats, counts, started_s, trainer)
    summary.update(_dpo_numbers(config, before, after, trainer.state.log_history))
    summary.update(exact_match_before=exact_before, exact_match_after=exact_after)
    summary["nonfinite_skipped_steps"] = guards.nonfinite.skipped_steps
    summary["data_fingerprints"] = data_fingerprints(config.data)
    summary["batch_size_used"] = trainer.state.train_batch_size
    rd.write_summary(run_dir, summary, guards.metrics.tracker)
    _print_summary(console, summary, run_dir)
    return DpoResult(run_dir, summary, trainer.model, tokenizer)


def build_reference(config: RunConfig, policy, tokenizer):
    """The frozen reference model of dpo.reference (trl_stage.reference_model); None for the losses without one."""
    if config.dpo.loss in REFERENCE_FREE_LOSSES:
        return None
    return reference_model(config, policy, tokenizer, config.dpo.reference)


def describe_reference(config: RunConfig) -> str:
    if config.dpo.loss in REFERENCE_FREE_LOSSES:
        return f"none (loss {config.dpo.loss} scores answers by the policy's mean token log-probability alone)"
    return reference_description(config, config.dpo.reference)


def build_dpo_trainer(config: RunConfig, run_dir: Path, policy, reference, tokenizer, train_rows: list[dict],
                      validation_rows: list[dict], console: Console):
    """(PreferenceTrainer, Guards) for the policy (not yet wrapped: with LoRA, TRL wraps it with dsft's LoRA config,
    so the reference pass disables that adapter) and the reference (None: the adapter-disabled policy).

    Raises DsftError when method.lora.target_modules names no module of the model.
    """
    d = config.dpo
    collator = WithSampleIds(DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id))
    if d.loss in REFERENCE_FREE_LOSSES:
        trainer, guards = _reference_free_trainer(config, run_dir, policy, tokenizer, train_rows, validation_rows,
                                                  console, collator)
    else:
        args = trl_arguments(config, run_dir, bool(validation_rows), DPOConfig, beta=d.beta, loss_type=[d.loss],
                             label_smoothing=d.label_smoothing, router_aux_loss_coef=router_aux_loss_coef(policy))
        trainer, guards = build_reference_trainer(config, run_dir, policy, reference, tokenizer, train_rows,
                                                  validation_rows, console, collator, PreferenceTrainer, args)
    if config.train.packing:
        # TRL's DPOConfig.padding_free is switched off in TRL 1.16: each batch is packed under TRL's loss instead.
        pack_trainer_forwards(trainer)
        attention = use_packed_attention(config, *[m for m in (trainer.model, trainer.ref_model) if m is not None])
        console.print(f"packing: each batch of {config.train.batch_size} pairs runs as one row of its chosen and "
                      f"rejected sequences, no padding ({attention})")
    guards.progress.status_keys = {"rewards/margins": "margin", "rewards/accuracies": "acc"}
    return trainer, guards


def _reference_free_trainer(config: RunConfig, run_dir: Path, policy, tokenizer, train_rows: list[dict],
                            validation_rows: list[dict], console: Console, collator):
    """(ReferenceFreeTrainer, Guards) for dpo.loss simpo or orpo; policy comes wrapped for its method already."""
    d = config.dpo
    args = training_arguments(config.train, run_dir, bool(validation_rows))
    validation = as_dataset(validation_rows, False) if validation_rows else []
    return build_trainer(config, run_dir, policy, tokenizer, as_dataset(train_rows, True), validation, console,
                         collator, trainer_class=ReferenceFreeTrainer, args=args, packing="own",
                         preference_loss=d.loss, beta=d.beta, simpo_gamma=d.simpo_gamma,
                         label_smoothing=d.label_smoothing, router_aux_loss_coef=router_aux_loss_coef(policy))


def _evaluate(trainer, console: Console, when: str) -> dict:
    """The trainer's evaluation on the validation pairs (also in metrics.jsonl)."""
    metrics = trainer.evaluate()
    preference = metrics["eval_logps/chosen"] - metrics["eval_logps/rejected"]
    console.print(f"validation {when}: reward margin {metrics['eval_rewards/margins']:.4f}, reward accuracy "
                  f"{metrics['eval_rewards/accuracies']:.3f}, log p(chosen) - log p(rejected) {preference:.3f}")
    return metrics


def _exact_match(model, tokenizer, config: RunConfig, console: Console, when: str) -> float | None:
    """Exact match of greedy answers on eval.generate_files (as SFT scores them), or None without them."""
    if not config.eval.generate_files:
        return None
    data, stats = config.data, DataStats()
    examples = load_examples(config.eval.generate_files, data.format, data.on_error, stats, data.system_prompt,
                             fields=FieldMap.of(data))
    examples = [e for e in examples if e.messages and e.messages[-1].role == "assistant"][: config.eval.max_samples]
    settings = DecodeSettings(max_new_tokens=config.eval.max_new_tokens)
    result = score_exact_match(model, tokenizer, examples, data.chat_template, settings, config.eval.batch_size,
                               data.thinking_mode)
    console.print(f"exact match {when}: {result.accuracy:.3f} on {result.count} held-out prompts")
    return result.accuracy


def _dpo_numbers(config: RunConfig, before: dict, after: dict, log_history: list[dict]) -> dict:
    """summary.json entries: DPO settings; reward margins and accuracies on validation and at the first and last
    training log; the policy's log p(chosen) - log p(rejected) on validation before and after."""
    train_logs = [record for record in log_history if "loss" in record and "rewards/margins" in record]
    first, last = (train_logs[0], train_logs[-1]) if train_logs else ({}, {})
    numbers = {"dpo": {**config.dpo.model_dump(), "reference": describe_reference(config)}}
    for key in REWARD_KEYS:
        name = key.replace("/", "_")
        numbers[f"eval_{name}"] = after.get(f"eval_{key}")
        numbers[f"train_{name}_first_log"] = first.get(key)
        numbers[f"train_{name}_last_log"] = last.get(key)
    for when, metrics in (("before", before), ("after", after)):
        numbers[f"eval_logps_margin_{when}"] = (metrics["eval_logps/chosen"] - metrics["eval_logps/rejected"]
                                                if metrics else None)
    return numbers


def _print_summary(console: Console, summary: dict, run_dir: Path) -> None:
    table = Table(title=f"dsft run {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("steps", "final_train_loss", "train_rewards_margins_first_log", "train_rewards_margins_last_log",
                "train_rewards_accuracies_last_log", "final_eval_loss", "eval_rewards_margins", "eval_rewards_accuracies",
                "eval_logps_margin_before", "eval_logps_margin_after", "exact_match_before", "exact_match_after",
                "wall_time_s"):
        if summary[key] is not None:
            table.add_row(key, format_number(summary[key]))
    console.print(table)
