"""`dsft eval` for classifier runs (task classification, token_classification or multitask), top to bottom:
load the run(s) -> read labelled records -> predict in batches, timed -> score -> write results.

Predictions come from the same code as `dsft predict`, so eval and predict never disagree.
Sequence classifiers get accuracy, macro/micro F1, per-class scores, bootstrap intervals, the
confusion matrix (PNG and table) and the most confused pairs with examples; token classifiers
get span-level precision/recall/F1 per entity type (seqeval); a multitask run is scored head by head
on the records labelled for that head. All get throughput, batch latency
and peak memory. With --against, a second run is scored on the same records, side by side.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dsft import __version__
from dsft.config import RunConfig
from dsft.config.eval import eval_settings
from dsft.data.read import RawRecord, read_records
from dsft.errors import DsftError
from dsft.eval.classification import bootstrap_intervals, classification_report
from dsft.eval.error_analysis import confusion_markdown, worst_markdown, write_error_analysis
from dsft.eval.expert_load import add_eval_expert_load
from dsft.eval.speed import process_peak_memory
from dsft.eval.tracked import log_eval_to_run
from dsft.models.moe import ExpertLoads
from dsft.models.predict import predictor

HEAD_TASKS = ("classification", "token_classification", "multitask")
"""Run tasks dsft eval scores with their labels (the rest are generative: dsft/eval/evaluate.py)."""


def head_task(target_path: str) -> str | None:
    """The task of a classifier run directory, or None for a generative run or a plain model."""
    from dsft.config import load_config

    config_path = Path(target_path) / "config.yaml"
    if not config_path.is_file():
        return None
    task = load_config(config_path).task
    return task if task != "causal_lm" else None


def run_head_eval(target_path: str, data_path: str, against_path: str | None, out_dir: str | None,
                  overrides=(), console: Console | None = None) -> dict:
    """Score a classifier run (and optionally another) on labelled records; writes results.json, report.md
    and the error analysis into out_dir (default RUN/eval). Raises DsftError for a task dsft eval cannot
    score, runs of different tasks, or a record without its label (naming file:line)."""
    from dsft.models.load import load_run

    console = console or Console(soft_wrap=True)
    runs = {"target": target_path} | ({"against": against_path} if against_path else {})
    loaded = {role: load_run(path) for role, path in runs.items()}
    tasks = {role: config.task for role, (_, _, config) in loaded.items()}
    if len(set(tasks.values())) != 1 or tasks["target"] not in HEAD_TASKS:
        raise DsftError(f"dsft eval scores classifier runs of one task ({' | '.join(HEAD_TASKS)}); got {tasks}")
    settings = eval_settings(loaded["target"][2].eval, overrides)
    records = list(read_records(data_path))[: settings.max_samples]
    out = Path(out_dir) if out_dir else Path(target_path) / "eval"
    sections, measured = {}, {}
    for role, (model, tokenizer, config) in loaded.items():
        console.print(f"evaluating {role}: {runs[role]}")
        counter = ExpertLoads(model, mode="all")  # counts the prediction passes (nothing for a dense model)
        sections[role] = _score_run(model, tokenizer, config, records, settings, out / role)
        measured[role] = (counter.routers, counter.take_counts()) if counter.routers else None
        counter.remove()
    results = {
        "dsft_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "task": tasks["target"],
        "data": {"path": str(data_path), "sha256": hashlib.sha256(Path(data_path).read_bytes()).hexdigest(),
                 "records": len(records)},
        "models": {role: {"name": str(runs[role]), **section} for role, section in sections.items()},
    }
    add_eval_expert_load(results, measured, {role: str(path) for role, path in runs.items()}, out, data_path)
    _write(results, out, console)
    log_eval_to_run(target_path, results, out, console)
    return results


def _score_run(model, tokenizer, config: RunConfig, records: list[RawRecord], settings, out: Path) -> dict:
    """Predict every record (timed) and score against its labels."""
    import torch

    predict_batch = predictor(config.task)
    predicted, batch_latencies_s = [], []
    with torch.no_grad():
        for start in range(0, len(records), settings.batch_size):
            batch = records[start:start + settings.batch_size]
            started_s = time.perf_counter()
            predicted += predict_batch(model, tokenizer, config, batch)
            batch_latencies_s.append(time.perf_counter() - started_s)
    section = {"speed": _speed(batch_latencies_s, len(records), settings.batch_size)}
    if config.task == "classification":
        section.update(_score_labels(config, records, predicted, settings, out))
    elif config.task == "token_classification":
        section.update(_score_tags(config, records, predicted))
    else:
        section.update(_score_heads(config, records, predicted, out))
    return section


def _score_heads(config: RunConfig, records, predicted, out: Path) -> dict:
    """Per head: its metrics over the records that carry its label (a partially labelled file is fine)."""
    from dsft.eval.ner import ner_report

    heads, headline = {}, {}
    for head in config.multitask.heads:
        pairs = [(record, p["predictions"][head.name]) for record, p in zip(records, predicted)
                 if record.data.get(head.label_field) is not None]
        if head.kind == "sequence":
            predictions = [p["label"] for _, p in pairs]
            references = [str(record.data[head.label_field]) for record, _ in pairs]
            report = classification_report(predictions, references, normalize=False)
            texts = [_record_text(record, config) for record, _ in pairs]
            if pairs:
                write_error_analysis(out / head.name, report, predictions, references, texts, f"head {head.name}")
            headline[f"{head.name}_accuracy"] = report["accuracy"] if pairs else 0.0
        else:
            report = ner_report([record.data[head.label_field] for record, _ in pairs], [p["tags"] for _, p in pairs])
            headline[f"{head.name}_f1"] = report["f1"]
        heads[head.name] = {"kind": head.kind, "labelled_records": len(pairs), "report": report}
    return {"heads": heads, "headline": headline}


def _record_text(record: RawRecord, config: RunConfig) -> str:
    settings = config.multitask
    if settings.tokens_field in record.data:
        separator = " " if settings.word_separator == "space" else ""
        return separator.join(map(str, record.data[settings.tokens_field]))
    return str(record.data.get(settings.text_field, ""))


def _score_labels(config: RunConfig, records, predicted, settings, out: Path) -> dict:
    from dsft.data.labels import text_of

    field = config.classify.label_field
    references = [str(_required(record, field)) for record in records]
    predictions = [p["prediction"] for p in predicted]
    report = classification_report(predictions, references, normalize=False)
    texts = [text_of(record, config.classify.text_field) for record in records]
    pairs = write_error_analysis(out, report, predictions, references, texts, f"{config.task} on {len(records)} records")
    intervals = bootstrap_intervals(predictions, references, settings.bootstrap_resamples, settings.seed,
                                    settings.confidence)
    return {"classification": report, "intervals": intervals, "worst_confusions": pairs,
            "headline": {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "micro_f1": report["micro_f1"]}}


def _score_tags(config: RunConfig, records, predicted) -> dict:
    from dsft.eval.ner import ner_report

    field = config.token_classify.tags_field
    references = [_required(record, field) for record in records]
    report = ner_report(references, [p["tags"] for p in predicted])
    return {"ner": report, "headline": {key: report[key] for key in ("f1", "precision", "recall", "macro_f1")}}


def _required(record: RawRecord, field: str):
    if field not in record.data or record.data[field] is None:
        raise DsftError(f"{record.source}: field {field!r} is missing; dsft eval needs each record's label")
    return record.data[field]


def _speed(batch_latencies_s: list[float], records: int, batch_size: int) -> dict:
    """Throughput over the whole pass, the median batch latency (first batch left out: warm-up), peak memory."""
    steady = sorted(batch_latencies_s[1:] or batch_latencies_s)
    total_s = sum(batch_latencies_s)
    return {"records_per_s": round(records / total_s, 2) if total_s else None, "batch_size": batch_size,
            "batch_latency_ms_p50": round(1000 * steady[len(steady) // 2], 2) if steady else None,
            "peak_memory": process_peak_memory()}


def _write(results: dict, out: Path, console: Console) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text("\n".join(_report_lines(results)) + "\n", encoding="utf-8")
    table = Table(title=f"dsft eval ({results['task']}, {results['data']['records']} records)")
    roles = list(results["models"])
    table.add_column("metric")
    for role in roles:
        table.add_column(role, justify="right")
    for key in results["models"]["target"]["headline"]:
        table.add_row(key, *(f"{results['models'][r]['headline'][key]:.4f}" for r in roles))
    table.add_row("records/s", *(str(results["models"][r]["speed"]["records_per_s"]) for r in roles))
    console.print(table)
    console.print(f"results: {out / 'results.json'}, report: {out / 'report.md'}")


def _report_lines(results: dict) -> list[str]:
    lines = [f"# dsft eval: {results['task']}", "", f"data: {results['data']['path']} ({results['data']['records']} records)", ""]
    for role, section in results["models"].items():
        lines += [f"## {role}: {section['name']}", ""]
        lines += [f"- {key}: {value:.4f}" + _interval(section, key) for key, value in section["headline"].items()]
        speed = section["speed"]
        lines += [(f"- speed: {speed['records_per_s']} records/s, batch {speed['batch_size']} median latency "
                   f"{speed['batch_latency_ms_p50']} ms"), ""]
        if "classification" in section:
            lines += ["### Confusion matrix", "", *confusion_markdown(section["classification"]), "",
                      "### Most confused pairs", "", *worst_markdown(section["worst_confusions"]), ""]
        if "ner" in section:
            lines += ["| type | precision | recall | f1 | support |", "|---|---|---|---|---|"]
            lines += [f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |"
                      for name, row in section["ner"]["per_type"].items()] + [""]
    return lines


def _interval(section: dict, key: str) -> str:
    low_high = section.get("intervals", {}).get(key)
    return f" [{low_high[0]:.4f}, {low_high[1]:.4f}]" if low_high else ""
