"""Multi-task heads on one backbone, top to bottom: config -> tokenizer -> partially labelled data -> backbone
and heads -> trainer -> run directory.

Each head (kind sequence: a label per text; kind token: a BIO tag per word) learns from the records
that carry its label; the loss is the weighted sum of the heads' losses (dsft/models/multitask.py).
The loop, callbacks, checkpoints and saving are the shared ones; this stage adds each head's training
loss to the log (loss_<head>) and each head's metrics at every evaluation (eval_<head>_<metric>) and
in summary.json ("tasks"), computed over the validation records labelled for that head.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformers import TrainerCallback

from dsft.config import RunConfig
from dsft.data.bio import IGNORE_INDEX
from dsft.data.dataset import DataStats
from dsft.data.multitask import (
    MultitaskCollator,
    build_multitask_datasets,
    label_key,
    labelled_counts,
    load_multitask,
    record_text,
)
from dsft.eval.classification import classification_report
from dsft.eval.ner import SCALAR_KEYS as SPAN_KEYS
from dsft.eval.ner import ner_report
from dsft.models.load import build_backbone
from dsft.models.method import count_parameters
from dsft.models.multitask import HeadSpec, MultitaskModel, apply_backbone_method
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
from dsft.train.trainer import DsftTrainer

SEQUENCE_KEYS = ("accuracy", "macro_f1", "micro_f1")
"""A sequence head's single numbers (logged as eval_<head>_<key>); a token head's are ner.SCALAR_KEYS."""


@dataclasses.dataclass
class MultitaskResult:
    run_dir: Path
    summary: dict
    model: MultitaskModel
    """The trained model in memory (its backbone a PEFT model for LoRA)."""
    tokenizer: object
    heads: list[HeadSpec]


def run_multitask(
    config: RunConfig, resume: bool = False, console: Console | None = None, resume_command: str = "dsft train CONFIG --resume"
) -> MultitaskResult:
    """Train the heads of config.multitask on one backbone and write the run directory.

    Raises DsftError for bad input, TrainingInterrupted after a signal and TrainingDiverged on a
    non-finite loss or gradient, as run_sft does.
    """
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    console = console or Console(soft_wrap=True)
    hf_logging.disable_progress_bar()
    started_s = time.perf_counter()
    run_dir = rd.prepare_run_dir(config.output, resume)
    console.print(f"run directory: {run_dir}")

    # Setup: tokenizer (trained on the texts for a preset), then the rows and each head's labels.
    set_seed(config.train.seed)
    tokenizer = rd.run_tokenizer(config.model, run_dir, lambda: _training_texts(config))
    rd.save_config(config, run_dir)
    settings = config.multitask
    train_rows, validation_rows, labels, stats = build_multitask_datasets(config.data, settings, tokenizer, config.train.seed)
    for sample_id, row in enumerate(train_rows):
        row["sample_id"] = sample_id  # for the ledger of consumed samples (samples.jsonl)
    labelled = {"train": labelled_counts(train_rows, settings.heads),
                "validation": labelled_counts(validation_rows, settings.heads)}
    heads = [HeadSpec(h.name, h.kind, labels[h.name], h.loss_weight) for h in settings.heads]
    for line in _data_lines(stats, heads, labelled):
        console.print(f"data: {line}")

    # Model: the causal LM's base model, adapted per method, with a head per task.
    backbone = build_backbone(config.model, tokenizer, config.train.seed)
    rd.save_preset_base_for_lora(backbone, config, run_dir)
    backbone = apply_backbone_method(backbone, config.method)
    model = MultitaskModel(backbone, heads, tokenizer.pad_token_id, config.train.seed)
    counts = count_parameters(model)
    console.print(f"method {config.method.type} (heads train in full): {counts.line()}")
    if config.train.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable()
        model.backbone.enable_input_require_grads()

    # Train.
    head_losses = HeadLossLog(model, [head.name for head in heads])
    trainer, guards = build_trainer(
        config, run_dir, model, tokenizer, train_rows, validation_rows, console,
        packing="batches",
        data_collator=MultitaskCollator(tokenizer.pad_token_id, settings.heads),
        first_callbacks=[head_losses],
        trainer_class=MultitaskTrainer,
        compute_metrics=MultitaskMetrics(heads),
        preprocess_logits_for_metrics=predicted_ids,
    )
    trainer.label_names = [label_key(head.name) for head in heads]
    checkpoint = checkpoint_to_resume(run_dir, console) if resume else None
    train_output = train_guarded(trainer, guards, checkpoint, config.train, resume_command)
    eval_loss, reports = _final_evaluation(trainer, validation_rows, heads, guards.metrics.write)

    # Save: backbone (full or adapter), heads, multitask.json, tokenizer, then the numbers.
    save_model(trainer, tokenizer, run_dir, config)
    summary = run_summary(config, train_output, eval_loss, stats, counts, started_s, trainer)
    summary.update(task="multitask", heads=[dataclasses.asdict(head) for head in heads], labelled=labelled,
                   final_train_loss_by_head=_last_head_losses(trainer, heads), tasks=reports)
    summary["data_fingerprints"] = data_fingerprints(config.data)
    summary["batch_size_used"] = trainer.state.train_batch_size
    rd.write_summary(run_dir, summary, guards.metrics.tracker)
    _print_summary(console, summary, heads, run_dir)
    return MultitaskResult(run_dir, summary, trainer.model, tokenizer, heads)


class MultitaskTrainer(DsftTrainer):
    """DsftTrainer whose training loss weighs every labelled item of an optimizer step the same, per head
    (MultitaskModel.step_loss): the per-micro-batch means of MultitaskModel.loss would let an item in a micro-batch
    with fewer labels for its head weigh more (gradient accumulation; an epoch's uneven last step over ranks)."""

    items_per_step: dict[str, int] | None = None
    """Items labelled per head in the current optimizer step over all ranks, counted as its micro-batches are
    fetched."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            heads = self.accelerator.unwrap_model(self.model).head_specs
            totals = self.step_totals(batch_samples, lambda batch: [
                int((batch[label_key(h.name)] != IGNORE_INDEX).sum()) if label_key(h.name) in batch else 0
                for h in heads])
            self.items_per_step = {head.name: total for head, total in zip(heads, totals)}
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and self.items_per_step is not None:
            # inputs still hold the labels_<head> tensors the model read
            loss = self.accelerator.unwrap_model(model).step_loss(outputs.logits, inputs, self.items_per_step,
                                                                  self.micro_batches_per_step)
        return (loss, outputs) if return_outputs else loss


class HeadLossLog(TrainerCallback):
    """Adds each head's mean training loss since the previous log record to it, as loss_<head>.

    A forward hook on the model sums the head losses of training micro-batches (on the device, so no
    synchronisation per step); a micro-batch that labels nothing for a head does not count for it.
    It must run before the callbacks that write the log record (build_trainer's first_callbacks).
    """

    def __init__(self, model, head_names: Sequence[str]):
        self.head_names = list(head_names)
        self._reset()
        model.register_forward_hook(self._record)

    def _reset(self) -> None:
        self._sums = {name: 0.0 for name in self.head_names}
        self._batches = {name: 0 for name in self.head_names}

    def _record(self, module, args, output) -> None:
        if not module.training or output.head_losses is None:
            return  # evaluation batches are not training loss
        for name, loss in output.head_losses.items():
            labelled = (output.head_items[name] > 0).to(loss.dtype)
            self._sums[name] = self._sums[name] + loss.detach() * labelled
            self._batches[name] = self._batches[name] + labelled

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        for name in self.head_names:
            batches = float(self._batches[name])
            if batches > 0:
                logs[f"loss_{name}"] = round(float(self._sums[name]) / batches, 6)
        self._reset()


def predicted_ids(outputs, labels):
    """preprocess_logits_for_metrics: keep each head's argmax class ids (a tuple in head order) between
    evaluation batches, not the logits."""
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    return tuple(head_logits.argmax(-1) for head_logits in logits.values())


def head_reports(predictions, label_ids, heads: Sequence[HeadSpec]) -> dict[str, dict | None]:
    """Each head's report over the records labelled for it (None when none is): a sequence head's
    classification_report, a token head's span-level ner_report; each with "labelled" (the record count).

    predictions and label_ids hold one array per head, in head order: [N] class ids, or [N, L] token
    class ids with IGNORE_INDEX where unlabelled.
    """
    predictions, label_ids = _per_head(predictions), _per_head(label_ids)
    reports = {}
    for head, predicted, reference in zip(heads, predictions, label_ids):
        if head.kind == "sequence":
            pairs = [(int(p), int(r)) for p, r in zip(predicted, reference) if r != IGNORE_INDEX]
            report = classification_report([head.labels[p] for p, _ in pairs], [head.labels[r] for _, r in pairs]) if pairs else None
        else:
            pairs = _tag_lists(predicted, reference, head.labels)
            report = ner_report([r for _, r in pairs], [p for p, _ in pairs]) if pairs else None
        reports[head.name] = None if report is None else {"labelled": len(pairs), **report}
    return reports


def _per_head(arrays) -> tuple:
    """The Trainer unwraps a 1-tuple; put it back so one head works as several do."""
    return tuple(arrays) if isinstance(arrays, (tuple, list)) else (arrays,)


def _tag_lists(predicted_NL, reference_NL, tags: Sequence[str]) -> list[tuple[list[str], list[str]]]:
    """(predicted tags, reference tags) of the words of each record labelled for a token head; the words
    are the labelled positions (each word's first token)."""
    pairs = []
    for predicted_L, reference_L in zip(predicted_NL, reference_NL):
        positions = [i for i, label in enumerate(reference_L) if label != IGNORE_INDEX]
        if positions:
            pairs.append(([tags[int(predicted_L[i])] for i in positions], [tags[int(reference_L[i])] for i in positions]))
    return pairs


class MultitaskMetrics:
    """compute_metrics: each head's single numbers as <head>_<metric> (logged as eval_<head>_<metric>)."""

    def __init__(self, heads: Sequence[HeadSpec]):
        self.heads = list(heads)

    def __call__(self, eval_prediction) -> dict:
        return flat_metrics(head_reports(eval_prediction.predictions, eval_prediction.label_ids, self.heads), self.heads)


def flat_metrics(reports: dict[str, dict | None], heads: Sequence[HeadSpec]) -> dict[str, float]:
    flat = {}
    for head in heads:
        report = reports[head.name]
        if report is None:
            continue
        for key in SEQUENCE_KEYS if head.kind == "sequence" else SPAN_KEYS:
            flat[f"{head.name}_{key}"] = report[key]
        flat[f"{head.name}_labelled"] = report["labelled"]
    return flat


def _final_evaluation(trainer, validation_rows, heads, write) -> tuple[float | None, dict | None]:
    """(validation loss, {head: full report}) of the trained model; the single numbers also go to metrics.jsonl."""
    if not validation_rows:
        return None, None
    output = trainer.predict(validation_rows, metric_key_prefix="eval")
    reports = head_reports(output.predictions, output.label_ids, heads)
    write({"step": trainer.state.global_step, **{k: v for k, v in output.metrics.items() if isinstance(v, (int, float))}})
    return output.metrics["eval_loss"], reports


def _last_head_losses(trainer, heads) -> dict[str, float | None]:
    history = [r for r in trainer.state.log_history if "loss" in r]
    return {head.name: next((r[f"loss_{head.name}"] for r in reversed(history) if f"loss_{head.name}" in r), None)
            for head in heads}


def _training_texts(config: RunConfig):
    """The training texts, for training a preset's tokenizer."""
    settings = config.multitask
    for record in load_multitask(config.data.train_files, settings, config.data.on_error, DataStats(),
                                 config.data.max_samples):
        yield record_text(record, settings.word_separator)


def _data_lines(stats: DataStats, heads: Sequence[HeadSpec], labelled: dict) -> list[str]:
    lines = [line for line in stats.lines() if not line.startswith("train tokens")]
    lines.append(f"train tokens: {stats.train_tokens:,}")
    for head in heads:
        lines.append(f"head {head.name} ({head.kind}, weight {head.loss_weight:g}): labelled {labelled['train'][head.name]:,} "
                     f"train, {labelled['validation'][head.name]:,} validation; {len(head.labels)} labels: "
                     f"{', '.join(head.labels)}")
    return lines


def _print_summary(console: Console, summary: dict, heads: Sequence[HeadSpec], run_dir: Path) -> None:
    table = Table(title=f"dsft run {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("steps", "final_train_loss", "final_eval_loss", "wall_time_s"):
        if summary[key] is not None:
            table.add_row(key, format_number(summary[key]))
    for head in heads:
        report = (summary["tasks"] or {}).get(head.name)
        if report is not None:
            key = "accuracy" if head.kind == "sequence" else "f1"
            table.add_row(f"{head.name} {key} ({report['labelled']} labelled)", format_number(report[key]))
    console.print(table)
