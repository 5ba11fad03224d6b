"""Token classification (NER with BIO tags), top to bottom: config -> tokenizer -> tagged words -> classifier
-> trainer -> run directory.

The backbone is any causal LM with transformers' *ForTokenClassification head ("score" on every
token). Each word is encoded on its own and its first token carries its tag (dsft.data.bio); the
loss is cross entropy over those first tokens, averaged over the whole optimizer step. The loop, callbacks, checkpoints and
saving are the shared ones (dsft.train.loop); this stage adds the tag mapping and span-level
metrics (seqeval) at each evaluation, in summary.json and in ner_report.json / ner_report.md.

A causal backbone reads only the words to the left of a word's first token, so a tag that
depends on the words after it is out of reach; entities that the word itself or its left
context decides are what it learns.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dsft.config import RunConfig
from dsft.data.bio import IGNORE_INDEX
from dsft.data.dataset import DataStats
from dsft.data.tokens import build_token_datasets, training_texts
from dsft.eval.ner import SCALAR_KEYS, ner_report, write_report
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
class TokenClassifyResult:
    run_dir: Path
    summary: dict
    model: object
    """The trained token classifier in memory (a PeftModel for LoRA)."""
    tokenizer: object
    tags: list[str]
    """Tag names; a tag's position is its class id (O first)."""


def run_token_classify(
    config: RunConfig, resume: bool = False, console: Console | None = None, resume_command: str = "dsft train CONFIG --resume"
) -> TokenClassifyResult:
    """Train a token classifier as the config says and write the run directory.

    Raises DsftError for bad input (a record whose tags do not fit its words names file:line and the
    field), TrainingInterrupted after a signal and TrainingDiverged on a non-finite loss or gradient.
    """
    from transformers import DataCollatorForTokenClassification, set_seed
    from transformers.utils import logging as hf_logging

    console = console or Console(soft_wrap=True)
    hf_logging.disable_progress_bar()
    started_s = time.perf_counter()
    run_dir = rd.prepare_run_dir(config.output, resume)
    console.print(f"run directory: {run_dir}")

    # Setup: tokenizer (trained on the joined words for a preset), then tagged rows and the tag list.
    set_seed(config.train.seed)
    tc, data = config.token_classify, config.data
    tokenizer = rd.run_tokenizer(config.model, run_dir,
                                lambda: training_texts(data.train_files, tc, data.on_error, data.max_samples))
    rd.save_config(config, run_dir)
    train_rows, validation_rows, tags, stats = build_token_datasets(data, tc, tokenizer, config.train.seed)
    for sample_id, row in enumerate(train_rows):
        row["sample_id"] = sample_id  # for the ledger of consumed samples (samples.jsonl)
    for line in _data_lines(stats, tags):
        console.print(f"data: {line}")

    # Model and method (LoRA: the head "score" trains in full beside the adapter).
    model = rd.start_model(config, tokenizer, run_dir, console, tags, config.task)
    model = apply_method(model, config.method, "TOKEN_CLS")
    counts = count_parameters(model)
    console.print(f"method {config.method.type}: {counts.line()}")
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()

    # Train: cross entropy over first tokens, IGNORE_INDEX elsewhere and on padding.
    trainer, guards = build_trainer(
        config, run_dir, model, tokenizer, train_rows, validation_rows, console,
        packing="batches",
        data_collator=DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX),
        compute_loss_func=token_classification_loss,
        compute_metrics=_Metrics(tags),
        preprocess_logits_for_metrics=_predicted_ids,
    )
    trainer.label_names = ["labels"]  # a PeftModel's forward signature does not name them
    checkpoint = checkpoint_to_resume(run_dir, console) if resume else None
    train_output = train_guarded(trainer, guards, checkpoint, config.train, resume_command)
    eval_loss, report = _final_evaluation(trainer, validation_rows, tags, guards.metrics.write)
    if report is not None:
        write_report(run_dir, report)

    # Save: adapter or full model (tags in config.json id2label), tokenizer, then the numbers.
    save_model(trainer, tokenizer, run_dir, config)
    if config.method.adapter:
        # The adapter files hold no labels; config.json beside them does, for dsft predict and plain transformers.
        trainer.model.get_base_model().config.save_pretrained(run_dir)
    summary = run_summary(config, train_output, eval_loss, stats, counts, started_s, trainer)
    summary.update(task="token_classification", labels=tags, entity_types=sorted({t[2:] for t in tags if t != "O"}))
    summary.update({key: report[key] if report else None for key in SCALAR_KEYS})
    summary["ner"] = report
    summary["data_fingerprints"] = data_fingerprints(config.data)
    summary["batch_size_used"] = trainer.state.train_batch_size
    rd.write_summary(run_dir, summary, guards.metrics.tracker)
    _print_summary(console, summary, run_dir)
    return TokenClassifyResult(run_dir, summary, trainer.model, tokenizer, tags)


def token_classification_loss(outputs, labels_BT, num_items_in_batch=None):
    """The Trainer's compute_loss_func: cross entropy summed over the tagged tokens (IGNORE_INDEX elsewhere) and
    divided by num_items_in_batch, the tagged tokens of the whole optimizer step over every rank and accumulation
    step; without it, by this batch's tagged tokens (the model's own mean).

    Not the model's own loss: that is this batch's mean, yet its forward takes keyword arguments, so the Trainer
    takes it for one already divided by the step's tokens and neither divides it by the accumulation steps nor
    undoes its multiplication by the world size (measured: twice the loss with grad_accum_steps 2 or 2 ranks)."""
    import torch.nn.functional as F

    logits_NC = outputs.logits.float().flatten(0, -2)  # as the model's own loss, in float32
    labels_N = labels_BT.reshape(-1).to(logits_NC.device)
    summed = F.cross_entropy(logits_NC, labels_N, ignore_index=IGNORE_INDEX, reduction="sum")
    items = (labels_N != IGNORE_INDEX).sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return summed / items


def _predicted_ids(logits, labels):
    """Keep only the argmax tag ids (B, T) between evaluation batches, not the logits (B, T, tags)."""
    logits_BTC = logits[0] if isinstance(logits, tuple) else logits
    return logits_BTC.argmax(-1)


def word_tags(predicted_ids_BT, label_ids_BT, tags: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """(reference tags, predicted tags) per sentence, one per word: read at the tokens that carry a label
    (each word's first token). Words cut off by truncation carry none and are not scored."""
    references, predictions = [], []
    for predicted_T, label_T in zip(predicted_ids_BT, label_ids_BT):
        positions = [t for t, label in enumerate(label_T) if label != IGNORE_INDEX]
        references.append([tags[int(label_T[t])] for t in positions])
        predictions.append([tags[int(predicted_T[t])] for t in positions])
    return references, predictions


class _Metrics:
    """compute_metrics: span precision, recall, F1 (micro), macro F1 and token accuracy (logged as eval_*)."""

    def __init__(self, tags: list[str]):
        self.tags = tags

    def __call__(self, eval_prediction) -> dict:
        report = ner_report(*word_tags(eval_prediction.predictions, eval_prediction.label_ids, self.tags))
        return {key: report[key] for key in SCALAR_KEYS}


def _final_evaluation(trainer, validation_rows, tags, write) -> tuple[float | None, dict | None]:
    """(validation loss, full NER report) of the trained model, also written to metrics.jsonl."""
    if not validation_rows:
        return None, None
    output = trainer.predict(validation_rows, metric_key_prefix="eval")
    report = ner_report(*word_tags(output.predictions, output.label_ids, tags))
    write({"step": trainer.state.global_step, **{k: v for k, v in output.metrics.items() if isinstance(v, float)}})
    return output.metrics["eval_loss"], report


def _data_lines(stats: DataStats, tags: list[str]) -> list[str]:
    lines = [line for line in stats.lines() if not line.startswith("train tokens")]
    tokens = f"train tokens: {stats.train_tokens:,}, tagged (first token of a word): {stats.trainable_tokens:,}"
    return [*lines, f"{tokens}; {len(tags)} tags: {', '.join(tags)}"]


def _print_summary(console: Console, summary: dict, run_dir: Path) -> None:
    table = Table(title=f"dsft run {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("steps", "final_train_loss", "final_eval_loss", "f1", "macro_f1", "token_accuracy", "wall_time_s"):
        if summary[key] is not None:
            table.add_row(key, format_number(summary[key]))
    for entity_type, row in (summary["ner"] or {}).get("per_type", {}).items():
        table.add_row(f"f1 {entity_type} ({row['support']} entities)", format_number(row["f1"]))
    console.print(table)
