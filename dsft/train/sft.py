"""Supervised fine-tuning, top to bottom: config -> tokenizer -> data -> model -> trainer -> run directory.

The loop is transformers' Trainer; dsft supplies the rendered data (assistant-only labels),
the method (full, LoRA, freeze), callbacks for metrics.jsonl, TensorBoard and progress, and
the run directory that loads with plain transformers / peft.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dsft.config import RunConfig
from dsft.data.chat import resolve_template
from dsft.data.columns import FieldMap
from dsft.data.dataset import DataStats, build_sft_datasets, example_texts, load_examples
from dsft.data.packing import PackedCollator
from dsft.eval.exact_match import ExactMatchResult, score_exact_match
from dsft.eval.in_training import EvalMetricsCallback
from dsft.models.generate import DecodeSettings
from dsft.models.kernels import apply_speed_plan, resolve_speed_plan
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
    tokenizer = rd.run_tokenizer(config.model, run_dir, lambda: _training_texts(config))
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
    model = rd.start_model(config, tokenizer, run_dir, console)
    model = apply_method(model, config.method)
    counts = count_parameters(model)
    console.print(f"method {config.method.type}: {counts.line()}")
    speed = resolve_speed_plan(config.train, model, attn_implementation=config.model.attn_implementation)
    apply_speed_plan(model, speed)
    console.print(speed.line())

    # Train (the Trainer puts the model on its device, so the score before training runs there too).
    trainer, guards = build_trainer(config, run_dir, model, tokenizer, train_rows, validation_rows, console, _Collator(tokenizer),
                                    loss_chunk_tokens=speed.loss_chunk_tokens if speed.chunked_loss else None)
    if validation_rows:
        trainer.add_callback(EvalMetricsCallback(tokenizer, template, validation_rows, _with_references(eval_examples),
                                                 config.eval, guards.metrics.write, config.data.thinking_mode))
    before = _score(model, tokenizer, eval_examples, template, config, console, "before training")
    checkpoint = checkpoint_to_resume(run_dir, console) if resume else None
    train_output = train_guarded(trainer, guards, checkpoint, config.train, resume_command)
    eval_loss = trainer.evaluate()["eval_loss"] if validation_rows else None

    # Save: adapter or full model, tokenizer, then the numbers.
    save_model(trainer, tokenizer, run_dir, config)
    after = _score(model, tokenizer, eval_examples, template, config, console, "after training")
    summary = run_summary(config, train_output, eval_loss, stats, counts, started_s, trainer)
    summary.update(exact_match_before=before.accuracy if before else None, exact_match_after=after.accuracy if after else None,
                   exact_match_samples=after.samples if after else [])
    summary["nonfinite_skipped_steps"] = guards.nonfinite.skipped_steps
    summary["speed"] = {**speed.as_dict(), "chunked_loss_micro_batches": trainer.chunked_loss_micro_batches}
    summary["data_fingerprints"] = data_fingerprints(config.data)
    summary["batch_size_used"] = trainer.state.train_batch_size  # smaller than configured after auto_find_batch_size
    rd.write_summary(run_dir, summary, guards.metrics.tracker)
    _print_summary(console, summary, run_dir)
    return SftResult(run_dir, summary, trainer.model, tokenizer)


def _training_texts(config: RunConfig):
    """Every string of the training data, for training a preset's tokenizer."""
    data = config.data
    for example in load_examples(data.train_files, data.format, data.on_error, DataStats(), data.system_prompt,
                                 data.max_samples, fields=FieldMap.of(data)):
        yield from example_texts(example, data.chat_template)


def _generation_examples(config: RunConfig, console: Console) -> list:
    if not config.eval.generate_files:
        return []
    stats = DataStats()
    examples = load_examples(config.eval.generate_files, config.data.format, config.data.on_error, stats,
                             config.data.system_prompt, fields=FieldMap.of(config.data))
    if stats.skipped_bad:
        console.print(f"eval data: skipped {stats.skipped_bad} bad records")
    return examples[: config.eval.max_samples] if config.eval.max_samples else examples



def _with_references(examples: list) -> list:
    return [e for e in examples if e.messages and e.messages[-1].role == "assistant"]


def _score(model, tokenizer, examples, template, config: RunConfig, console, when: str) -> ExactMatchResult | None:
    eval_config = config.eval
    if not examples or (when == "before training" and not eval_config.before_training):
        return None
    settings = DecodeSettings(max_new_tokens=eval_config.max_new_tokens)
    result = score_exact_match(model, tokenizer, examples, template, settings, eval_config.batch_size,
                               config.data.thinking_mode)
    console.print(f"exact match {when}: {result.accuracy:.3f} on {result.count} held-out prompts")
    return result



class _Collator:
    """Packs (lists of samples) become padding-free rows; plain samples are padded, labels with -100."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        self.padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        self.packed = PackedCollator(tokenizer.pad_token_id)

    def __call__(self, features):
        return self.packed(features) if isinstance(features[0], list) else self.padded(features)





def _print_summary(console: Console, summary: dict, run_dir: Path) -> None:
    table = Table(title=f"dsft run {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("steps", "final_train_loss", "final_eval_loss", "tokens_per_second", "wall_time_s",
                "exact_match_before", "exact_match_after"):
        value = summary[key]
        if value is not None:
            table.add_row(key, format_number(value))
    console.print(table)
