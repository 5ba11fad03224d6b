"""Sequence classification, top to bottom: config -> tokenizer -> labelled data -> classifier -> trainer -> run directory.

The backbone is any causal LM with transformers' *ForSequenceClassification head ("score" on the
last token that is not padding). The loop, callbacks, checkpoints and saving are the SFT stage's;
this stage adds the label mapping, the loss (weighted cross entropy with label smoothing, or focal)
and classification metrics at each evaluation and at the end.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dsft.config import ClassifyConfig, RunConfig
from dsft.data.dataset import DataStats
from dsft.data.labels import balanced_class_weights, build_classify_datasets, load_labelled
from dsft.eval.classification import classification_report
from dsft.eval.error_analysis import write_error_analysis
from dsft.models.method import apply_method, count_parameters, train_head_only
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
class ClassifyResult:
    run_dir: Path
    summary: dict
    model: object
    """The trained classifier in memory (a PeftModel for LoRA)."""
    tokenizer: object
    labels: list[str]
    """Label names; a label's position is its class id."""


def run_classify(
    config: RunConfig, resume: bool = False, console: Console | None = None, resume_command: str = "dsft train CONFIG --resume"
) -> ClassifyResult:
    """Train a classifier as the config says and write the run directory.

    Raises DsftError for bad input, TrainingInterrupted after a signal and TrainingDiverged on a
    non-finite loss or gradient, as run_sft does.
    """
    from transformers import DataCollatorWithPadding, set_seed
    from transformers.utils import logging as hf_logging

    console = console or Console(soft_wrap=True)
    hf_logging.disable_progress_bar()
    started_s = time.perf_counter()
    run_dir = rd.prepare_run_dir(config.output, resume)
    console.print(f"run directory: {run_dir}")

    # Setup: tokenizer (trained on the texts for a preset), then labelled rows and the label list.
    set_seed(config.train.seed)
    tokenizer = rd.run_tokenizer(config.model, run_dir, lambda: _training_texts(config))
    rd.save_config(config, run_dir)
    train_rows, validation_rows, labels, stats = build_classify_datasets(config.data, config.classify, tokenizer, config.train.seed)
    for sample_id, row in enumerate(train_rows):
        row["sample_id"] = sample_id  # for the ledger of consumed samples (samples.jsonl)
    for line in _data_lines(stats, labels):
        console.print(f"data: {line}")

    # Model and method.
    model = rd.start_model(config, tokenizer, run_dir, console, labels, "classification")
    model = apply_method(model, config.method, "SEQ_CLS")
    if config.classify.head_only:
        train_head_only(model)
    counts = count_parameters(model)
    console.print(f"method {config.method.type}{' (head only)' if config.classify.head_only else ''}: {counts.line()}")
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()

    # Train.
    weights = None
    if config.classify.class_weights == "balanced":
        weights = balanced_class_weights([row["labels"] for row in train_rows], len(labels))
        console.print("class weights: " + ", ".join(f"{label} {w:.3f}" for label, w in zip(labels, weights)))
    # Validation texts as the model saw them (decoded after truncation), for the error analysis.
    validation_texts = [tokenizer.decode(row["input_ids"], skip_special_tokens=True) for row in validation_rows]
    metrics = _Metrics(labels, validation_texts, run_dir)
    trainer, guards = build_trainer(
        config, run_dir, model, tokenizer, train_rows, validation_rows, console,
        packing="batches",
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_loss_func=ClassificationLoss(config.classify, weights),
        compute_metrics=metrics,
        preprocess_logits_for_metrics=_predicted_ids,
    )
    trainer.label_names = ["labels"]
    metrics.trainer = trainer
    checkpoint = checkpoint_to_resume(run_dir, console) if resume else None
    train_output = train_guarded(trainer, guards, checkpoint, config.train, resume_command)
    eval_loss, report = _final_evaluation(trainer, validation_rows, labels, guards.metrics.write)

    # Save: adapter or full model (labels in config.json id2label), tokenizer, then the numbers.
    save_model(trainer, tokenizer, run_dir, config)
    if config.method.adapter:
        # The adapter files hold no labels; config.json beside them does, for dsft predict and plain transformers.
        trainer.model.get_base_model().config.save_pretrained(run_dir)
    summary = run_summary(config, train_output, eval_loss, stats, counts, started_s, trainer)
    summary.update(task="classification", labels=labels, head_only=config.classify.head_only,
                   loss=config.classify.loss, class_weights=weights)
    summary.update({key: report[key] if report else None for key in ("accuracy", "macro_f1", "micro_f1")})
    summary["classification"] = report
    summary["worst_confusions"] = metrics.worst_confusions
    summary["data_fingerprints"] = data_fingerprints(config.data)
    summary["batch_size_used"] = trainer.state.train_batch_size
    rd.write_summary(run_dir, summary, guards.metrics.tracker)
    _print_summary(console, summary, run_dir)
    return ClassifyResult(run_dir, summary, trainer.model, tokenizer, labels)


def classification_loss(logits_BC, labels_B, weights_C: Sequence[float] | None = None, loss: str = "cross_entropy",
                        focal_gamma: float = 2.0, label_smoothing: float = 0.0, num_items_in_batch=None):
    """Cross entropy (class weights, label smoothing) or focal loss, averaged over the batch.

    As torch's weighted cross entropy, the mean divides by the summed weights of the true classes, so
    focal with gamma 0 equals cross entropy. With num_items_in_batch (the samples of all micro-batches
    of one optimizer step) the mean is scaled by this batch's share, so accumulated steps sum to one mean.
    """
    import torch
    import torch.nn.functional as F

    logits_BC = logits_BC.float()
    weight_C = None if weights_C is None else torch.as_tensor(weights_C, dtype=torch.float32, device=logits_BC.device)
    loss_B = F.cross_entropy(logits_BC, labels_B, weight=weight_C, label_smoothing=label_smoothing, reduction="none")
    if loss == "focal":
        p_true_B = logits_BC.softmax(-1).gather(1, labels_B[:, None]).squeeze(1)
        loss_B = (1.0 - p_true_B) ** focal_gamma * loss_B
    total_weight = labels_B.numel() if weight_C is None else weight_C[labels_B].sum()
    mean = loss_B.sum() / total_weight
    if num_items_in_batch is None:
        return mean
    return mean * labels_B.numel() / num_items_in_batch


class ClassificationLoss:
    """The Trainer's compute_loss_func(outputs, labels, num_items_in_batch) for classify settings."""

    def __init__(self, classify: ClassifyConfig, weights_C: Sequence[float] | None):
        self.classify = classify
        self.weights_C = weights_C

    def __call__(self, outputs, labels_B, num_items_in_batch=None):
        c = self.classify
        return classification_loss(outputs.logits, labels_B, self.weights_C, c.loss, c.focal_gamma,
                                   c.label_smoothing, num_items_in_batch)


def _predicted_ids(logits, labels):
    """Keep only the argmax class ids between evaluation batches, not the logits."""
    logits_BC = logits[0] if isinstance(logits, tuple) else logits
    return logits_BC.argmax(-1)


class _Metrics:
    """compute_metrics: accuracy, macro and micro F1 of argmax predictions (logged as eval_*); each evaluation
    also writes its confusion matrix (PNG and table) and most confused pairs into RUN/eval/step-N."""

    def __init__(self, labels: list[str], texts: list[str], run_dir: Path):
        self.labels, self.texts, self.run_dir = labels, texts, run_dir
        self.trainer = None  # set once the trainer exists: evaluations are named by its step
        self.worst_confusions: list[dict] = []

    def __call__(self, eval_prediction) -> dict:
        predictions = [self.labels[int(i)] for i in eval_prediction.predictions]
        references = [self.labels[int(i)] for i in eval_prediction.label_ids]
        report = classification_report(predictions, references, normalize=False)
        step = self.trainer.state.global_step if self.trainer is not None else 0
        self.worst_confusions = write_error_analysis(self.run_dir / "eval" / f"step-{step}", report, predictions,
                                                     references, self.texts, f"validation at step {step}")
        return {key: report[key] for key in ("accuracy", "macro_f1", "micro_f1")}


def _report(predicted_ids, label_ids, labels: list[str]) -> dict:
    return classification_report([labels[int(i)] for i in predicted_ids], [labels[int(i)] for i in label_ids],
                                 normalize=False)


def _final_evaluation(trainer, validation_rows, labels, write) -> tuple[float | None, dict | None]:
    """(validation loss, full classification report) of the trained model, also written to metrics.jsonl."""
    if not validation_rows:
        return None, None
    output = trainer.predict(validation_rows, metric_key_prefix="eval")
    report = _report(output.predictions, output.label_ids, labels)
    write({"step": trainer.state.global_step, **{k: v for k, v in output.metrics.items() if isinstance(v, float)}})
    return output.metrics["eval_loss"], report


def _training_texts(config: RunConfig):
    """The training texts, for training a preset's tokenizer."""
    c = config.classify
    for record in load_labelled(config.data.train_files, c.text_field, c.label_field, config.data.on_error,
                                DataStats(), config.data.max_samples):
        yield record.text


def _data_lines(stats: DataStats, labels: list[str]) -> list[str]:
    lines = [line for line in stats.lines() if not line.startswith("train tokens")]
    return lines + [f"train tokens: {stats.train_tokens:,}; {len(labels)} labels: {', '.join(labels)}"]


def _print_summary(console: Console, summary: dict, run_dir: Path) -> None:
    table = Table(title=f"dsft run {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("steps", "final_train_loss", "final_eval_loss", "accuracy", "macro_f1", "wall_time_s"):
        if summary[key] is not None:
            table.add_row(key, format_number(summary[key]))
    console.print(table)
