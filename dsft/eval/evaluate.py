"""`dsft eval`, top to bottom: settings -> data -> each model (generate, score, perplexity, speed) -> compare -> write.

Greedy decoding and fixed seeds by default, so a rerun gives the same numbers; results.json
records the rendered prompts, decoding settings, data fingerprint and model identities.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from dsft import __version__
from dsft.config import EvalConfig
from dsft.config.eval import eval_settings
from dsft.data.chat import render_conversation, render_prompt, render_text
from dsft.data.columns import FieldMap
from dsft.data.dataset import DataStats, load_examples, split_prompt_reference_optional
from dsft.data.encode import encode_segments
from dsft.data.formats import Example, Message
from dsft.eval.classification import (
    bootstrap_intervals,
    classification_report,
    plot_confusion_matrix,
)
from dsft.eval.expert_load import add_eval_expert_load
from dsft.eval.perplexity import perplexity
from dsft.eval.report import (
    plot_length_distribution,
    plot_loss_curves,
    plot_metric_bars,
    print_summary,
    write_report,
)
from dsft.eval.speed import measure_speed
from dsft.eval.targets import EvalTarget, load_target
from dsft.eval.text_metrics import score_generations
from dsft.eval.tool_metrics import tool_call_metrics
from dsft.eval.tracked import log_eval_to_run
from dsft.models.generate import (
    DecodeSettings,
    generate_batch,
    prompt_ids,
    split_reasoning,
)

# Per-example metric that decides which model won an example, first one available.
_WIN_METRICS = ("f1", "exact_match", "rougeL", "chrf")


@dataclass(frozen=True)
class Item:
    """One test example: the prompt messages and the reference answer (None when the data has none)."""

    index: int
    messages: tuple[Message, ...]
    reference: str | None
    example: Example


def run_eval(
    target_path: str, data_path: str, against_path: str | None = None, out_dir: str | None = None,
    overrides: list[str] | tuple[str, ...] = (), console: Console | None = None, settings: EvalConfig | None = None,
) -> dict:
    """Evaluate target (and against) on data_path; writes results.json, report.md and PNGs into out_dir.
    The settings are target's eval section with overrides applied, or settings as given (dsft gate scores two
    models with one set). A classifier run is scored on its labels instead (dsft/eval/evaluate_heads.py)."""
    from transformers import set_seed

    from dsft.eval.evaluate_heads import head_task, run_head_eval

    if head_task(target_path) is not None:
        return run_head_eval(target_path, data_path, against_path, out_dir, overrides, console)

    console = console or Console(soft_wrap=True)
    target = _on_device(load_target(target_path))
    if settings is None:
        settings = eval_settings(target.config.eval if target.config else EvalConfig(), overrides)
    data_format = target.config.data.format if target.config else "auto"
    fields = FieldMap.of(target.config.data) if target.config else FieldMap()
    examples = load_examples([data_path], data_format, "error", DataStats(), require_answer=False, fields=fields)
    items = [_item(i, example) for i, example in enumerate(examples)][: settings.max_samples]
    out = Path(out_dir) if out_dir else _default_out_dir(target_path)
    out.mkdir(parents=True, exist_ok=True)

    models = {"target": target}
    if against_path is not None:
        models["against"] = _on_device(load_target(against_path))
    sections, predictions, loads = {}, {}, {}
    for role, model_target in models.items():
        set_seed(settings.seed)
        console.print(f"evaluating {role}: {model_target.name}")
        sections[role], predictions[role] = _evaluate_model(model_target, items, settings)
        loads[role] = _expert_loads(model_target, items)
    results = _results(data_path, data_format, items, settings, sections, predictions)
    add_eval_expert_load(results, loads, {role: t.name for role, t in models.items()}, out, data_path)
    _write(results, out, target_path, console)
    log_eval_to_run(target_path, results, out, console)
    return results


def _expert_loads(target: EvalTarget, items: list[Item]):
    """(routers, counts_LE) of routing the evaluation sequences (prompt and reference, or the text) through an MoE
    model; None for a dense model or data with nothing to route."""
    from dsft.models.moe import find_routers, route_sequences

    routers = find_routers(target.model)
    sequences = [row["input_ids"] for row in (_perplexity_row(item, target) for item in items) if row is not None]
    if not routers or not sequences:
        return None
    return routers, route_sequences(target.model, sequences, 8)


def _on_device(target: EvalTarget) -> EvalTarget:
    import torch

    if torch.cuda.is_available():
        target.model.to("cuda")
    return target


def _item(index: int, example: Example) -> Item:
    if example.text is not None:
        return Item(index, (), None, example)
    messages, reference = split_prompt_reference_optional(example)
    return Item(index, messages, reference, example)


def _default_out_dir(target_path: str) -> Path:
    path = Path(target_path)
    return path / "eval" if (path / "config.yaml").is_file() else Path(f"eval-{path.name or 'model'}")


def _evaluate_model(target: EvalTarget, items: list[Item], settings: EvalConfig) -> tuple[dict, list[str | None]]:
    chat = [item for item in items if item.messages]
    settings_decode = DecodeSettings(max_new_tokens=settings.max_new_tokens)
    prompts = [prompt_ids(item.messages, target.template, target.tokenizer, target.thinking, item.example.tools) for item in chat]
    replies = generate_batch(target.model, target.tokenizer, prompts, settings_decode, settings.batch_size) if chat else []
    answers = {item.index: split_reasoning(reply)[1] for item, reply in zip(chat, replies)}
    predictions = [answers.get(item.index) for item in items]
    scored = score_generations(
        [answers[item.index] for item in chat], [item.reference for item in chat],
        [item.messages[-1].content for item in chat], settings,
    )
    section = {
        "name": target.name,
        "identity": target.identity,
        "metrics": dict(scored.corpus),
        "ci": {name: list(bounds) for name, bounds in scored.ci.items()},
        "unavailable": dict(scored.unavailable),
        "notes": list(scored.notes),
        "per_example": _spread(scored.per_example, chat, len(items)),
        "output_lengths_tokens": [len(ids) for ids in target.tokenizer(replies, add_special_tokens=False)["input_ids"]] if replies else [],
        "prompt_texts": [_rendered(item, target) for item in items],
    }
    _add_tool_calls(section, [answers[item.index] for item in chat], chat, target.template)
    if not chat:
        section["unavailable"]["generation"] = "the data holds text records only: no prompts to answer"
    if settings.task == "classification":
        _add_classification(section, [answers[item.index] for item in chat], [item.reference for item in chat], settings)
    _add_perplexity(section, target, items, settings)
    if prompts:
        section["speed"] = measure_speed(target.model, prompts, target.tokenizer.pad_token_id,
                                         settings.speed_batch_size, settings.speed_new_tokens)
    return section, predictions


def _add_tool_calls(section: dict, answers: list[str], chat: list[Item], template: str) -> None:
    """The tool-call metrics (dsft/eval/tool_metrics.py) of data whose references call tools."""
    references = [item.example.messages[-1].tool_calls if item.reference is not None else None for item in chat]
    metrics, unavailable = tool_call_metrics(answers, references, template)
    section["metrics"].update(metrics)
    if unavailable is not None and any(references):
        section["unavailable"]["tool_calls"] = unavailable


def _rendered(item: Item, target: EvalTarget) -> str | None:
    """The exact prompt text the model was given (None for a text record, which is only scored)."""
    if not item.messages:
        return None
    segments = render_prompt(item.messages, target.template, target.tokenizer, target.thinking, item.example.tools)
    return "".join(segment.text for segment in segments)


def _add_classification(section: dict, answers: list[str], references: list[str | None], settings: EvalConfig) -> None:
    if not any(reference is not None for reference in references):
        section["unavailable"]["classification"] = "the data has no reference labels"
        return
    report = classification_report(answers, references)
    section["classification"] = report
    section["metrics"].update(accuracy=report["accuracy"], macro_f1=report["macro_f1"])
    section["ci"].update(bootstrap_intervals(answers, references, settings.bootstrap_resamples, settings.seed,
                                             settings.confidence))


def _spread(per_example: dict, chat: list[Item], count: int) -> dict:
    """Per-example scores indexed like all items (None for text items)."""
    spread = {}
    for name, scores in per_example.items():
        values: list = [None] * count
        for item, score in zip(chat, scores):
            values[item.index] = score
        spread[name] = values
    return spread


def _add_perplexity(section: dict, target: EvalTarget, items: list[Item], settings: EvalConfig) -> None:
    if "perplexity" not in settings.metrics:
        return
    rows = [row for row in (_perplexity_row(item, target) for item in items) if row is not None]
    result = perplexity(target.model, rows, target.tokenizer.pad_token_id, settings.batch_size) if rows else None
    if result is None:
        section["unavailable"]["perplexity"] = "no reference answers or text to score"
        return
    section["metrics"]["perplexity"] = result.value
    section["perplexity_tokens"] = result.target_tokens


def _perplexity_row(item: Item, target: EvalTarget) -> dict | None:
    """Ids and labels scoring the reference answer given its prompt (or a whole text record)."""
    if item.example.text is not None:
        segments = render_text(item.example.text, target.tokenizer)
    elif item.reference is not None:
        segments = render_conversation(item.example.messages, target.template, target.tokenizer, "final_assistant",
                                       target.thinking, tools=item.example.tools)
    else:
        return None
    input_ids, labels = encode_segments(segments, target.tokenizer)
    return {"input_ids": input_ids, "labels": labels}


def _results(data_path, data_format, items, settings, sections, predictions) -> dict:
    data_bytes = Path(data_path).read_bytes()
    results = {
        "dsft_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "data": {"path": str(data_path), "sha256": hashlib.sha256(data_bytes).hexdigest(), "format": data_format,
                 "examples": len(items), "with_reference": sum(item.reference is not None for item in items)},
        "decoding": {"max_new_tokens": settings.max_new_tokens, "do_sample": False, "batch_size": settings.batch_size,
                     "seed": settings.seed},
        "settings": settings.model_dump(mode="json"),
        "notes": sections["target"]["notes"],
        "models": sections,
        "examples": _examples(items, predictions, sections),
    }
    if "against" in sections:
        results.update(_compare(sections, settings.examples_listed))
    for section in sections.values():
        # Both live on in results["examples"], example by example.
        for key in ("notes", "per_example", "prompt_texts"):
            section.pop(key)
    return results


def _examples(items: list[Item], predictions: dict, sections: dict) -> list[dict]:
    rows = []
    for item in items:
        row = {"index": item.index, "prompt": item.messages[-1].content if item.messages else item.example.text,
               "reference": item.reference,
               "rendered_prompt": {role: section["prompt_texts"][item.index] for role, section in sections.items()}}
        for role in sections:
            row[role] = predictions[role][item.index]
        row["scores"] = {role: {name: scores[item.index] for name, scores in section["per_example"].items()}
                         for role, section in sections.items()}
        rows.append(row)
    return rows


def _compare(sections: dict, listed: int) -> dict:
    target, against = sections["target"], sections["against"]
    differences = {name: value - against["metrics"][name] for name, value in target["metrics"].items()
                   if name in against["metrics"]}
    metric = next((name for name in _WIN_METRICS if name in target["per_example"]), None)
    if metric is None:
        return {"differences": differences, "won": [], "lost": []}
    gains = [(t - a, i) for i, (t, a) in enumerate(zip(target["per_example"][metric], against["per_example"][metric]))
             if t is not None and a is not None and t != a]
    won = [i for gain, i in sorted(gains, key=lambda g: (-g[0], g[1])) if gain > 0][:listed]
    lost = [i for gain, i in sorted(gains, key=lambda g: (g[0], g[1])) if gain < 0][:listed]
    return {"differences": differences, "won": won, "lost": lost, "won_lost_metric": metric}


def _write(results: dict, out: Path, target_path: str, console: Console) -> None:
    plots = []
    metrics_file = Path(target_path) / "metrics.jsonl"
    drawings = [("loss_curves.png", lambda p: plot_loss_curves(metrics_file, p)),
                ("metrics.png", lambda p: plot_metric_bars(results, p)),
                ("output_lengths.png", lambda p: plot_length_distribution(results, p))]
    for role, section in results["models"].items():
        if "classification" in section:
            drawings.append((f"confusion_{role}.png",
                             lambda p, s=section, r=role: plot_confusion_matrix(s["classification"], f"{r}: {s['name']}", p)))
    for name, draw in drawings:
        if draw(out / name):
            plots.append(name)
    if "expert_load" in results:
        plots.append("expert_load.png")  # drawn with expert_load.json (_add_expert_load)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    report = write_report(results, out, plots)
    print_summary(results, console)
    console.print(f"wrote {out / 'results.json'}, {report} and {len(plots)} plots")
