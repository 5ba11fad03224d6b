"""The report of a `dsft data prepare` run: report.json, report.md and PNG plots, from the pipeline's dict.

The report holds counts, sources (file:line) and digests only, never record texts or PII values,
so it can be shared where the data cannot. Plots use matplotlib's object API (Figure + the Agg
canvas), as dsft.eval.report does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dsft.markdown import MISSING, escape_cell
from dsft.plots import new_figure, overlaid_histograms, save_png

SPLITS = ("train", "validation", "test")
SPLIT_COLORS = {"train": "tab:blue", "validation": "tab:orange", "test": "tab:green"}
MAX_EXAMPLES_SHOWN = 10
"""Skip reasons, duplicate and contamination examples shown each in report.md; report.json keeps all."""
STAT_PERCENTILES = (50, 95)


# ---------------------------------------------------------------- report.json


def percentile_nearest_rank(sorted_values: list[int], percent: float) -> int:
    """The smallest value with at least percent % of values at or below it (an actual length, no interpolation)."""
    rank = max(1, math.ceil(percent / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def length_stats(lengths: list[int]) -> dict:
    """{count, min, mean, p50, p95, max} of lengths; mean to 2 decimals; all but count None when empty."""
    if not lengths:
        return {"count": 0, "min": None, "mean": None, "p50": None, "p95": None, "max": None}
    ordered = sorted(lengths)
    stats = {"count": len(ordered), "min": ordered[0], "mean": round(sum(ordered) / len(ordered), 2)}
    stats.update({f"p{p}": percentile_nearest_rank(ordered, p) for p in STAT_PERCENTILES})
    stats["max"] = ordered[-1]
    return stats


def report_summary(report: dict) -> dict:
    """The report with each split's token_lengths list replaced by its length_stats (what report.json holds)."""
    summary = dict(report)
    lengths = report.get("token_lengths") or {}
    summary["token_lengths"] = {split: length_stats(values) for split, values in lengths.items()}
    return summary


# ---------------------------------------------------------------- plots


def length_unit(report: dict) -> str:
    """'tokens' with a tokenizer, else 'characters' (what the pipeline counted)."""
    return "characters" if report.get("tokenizer") is None else "tokens"


def plot_token_lengths(report: dict, out_png: Path) -> bool:
    """Overlaid histograms of record length per split; False, writing nothing, when no split has records."""
    lengths_by_split = {split: values for split, values in (report.get("token_lengths") or {}).items() if values}
    if not lengths_by_split:
        return False
    # Shared bins so the splits' bars line up and compare.
    groups = {f"{split} ({len(values)})": (values, SPLIT_COLORS.get(split)) for split, values in lengths_by_split.items()}
    labels = (f"record length ({length_unit(report)})", "records", "Record length by split")
    overlaid_histograms(groups, labels, out_png)
    return True


def balance_labels(balance: dict) -> list[str]:
    """Labels of before, then any only in after, in their order of appearance."""
    labels = list(balance.get("before", {}))
    return labels + [label for label in balance.get("after", {}) if label not in labels]


def plot_balance(balance: dict, out_png: Path) -> None:
    """Grouped bars of records per class, before and after the balance step."""
    labels = balance_labels(balance)
    figure = new_figure(min(4.0 + 0.8 * len(labels), 16.0), 4.0)
    axes = figure.add_subplot()
    bar_width = 0.4
    for offset, (when, color) in zip((-0.2, 0.2), (("before", "tab:gray"), ("after", "tab:blue"))):
        counts = [balance.get(when, {}).get(label, 0) for label in labels]
        bars = axes.bar([i + offset for i in range(len(labels))], counts, bar_width, color=color, label=when)
        axes.bar_label(bars, fontsize=7, padding=2)
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set(ylabel="records", title="Class balance of the training split")
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    save_png(figure, out_png)


# ---------------------------------------------------------------- report.md


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _cell(value) -> str:
    return MISSING if value is None else escape_cell(str(value))


def _inputs_section(report: dict) -> list[str]:
    rows = [[_cell(item.get("path")), _cell(item.get("records"))] for item in report.get("inputs", [])]
    lines = ["## Inputs", "", *_table(["path", "records"], rows), ""]
    lines += [
        f"- format: {_cell(report.get('format'))}",
        f"- lengths counted in: {length_unit(report)}"
        + (f" (tokenizer {_cell(report['tokenizer'])})" if report.get("tokenizer") is not None else ""),
        f"- records read: {_cell(report.get('records_in'))}, skipped as bad: {_cell(report.get('skipped_bad'))}",
        "",
    ]
    reasons = report.get("skip_reasons") or []
    lines += [f"  - {escape_cell(reason)}" for reason in reasons[:MAX_EXAMPLES_SHOWN]]
    if len(reasons) > MAX_EXAMPLES_SHOWN:
        lines.append(f"  - …and {len(reasons) - MAX_EXAMPLES_SHOWN} more in report.json")
    return lines + ([""] if reasons else [])


def step_details(step: dict) -> str:
    """'reason count' pairs of a step's removed (and added), e.g. 'repetition 40, symbols 8'; — when none."""
    parts = [f"{reason} {count}" for reason, count in (step.get("removed") or {}).items()]
    if step.get("added"):
        parts.append(f"added {step['added']}")
    return ", ".join(parts) or MISSING


def step_rows(steps: list[dict]) -> list[list[str]]:
    """One row per step: name, records in, out, removed in all, removed by reason."""
    return [
        [str(step["step"]), _cell(step.get("in")), _cell(step.get("out")),
         str(sum((step.get("removed") or {}).values())), step_details(step)]
        for step in steps
    ]


def _steps_section(title: str, steps: list[dict]) -> list[str]:
    if not steps:
        return []
    return [f"## {title}", "", *_table(["step", "in", "out", "removed", "by reason"], step_rows(steps)), ""]


def masked_counts(report: dict) -> dict[str, int]:
    """PII found per kind, summed over every step that masked some."""
    totals: dict[str, int] = {}
    for step in [*report.get("steps", []), *report.get("train_steps", [])]:
        for kind, count in (step.get("masked") or {}).items():
            totals[kind] = totals.get(kind, 0) + count
    return totals


def _masked_section(report: dict) -> list[str]:
    if not any("masked" in step for step in report.get("steps", [])):
        return []
    rows = [[kind, str(count)] for kind, count in masked_counts(report).items()]
    body = _table(["kind", "masked"], rows) if rows else ["No personal data found."]
    return ["## Personal data masked", "", *body, ""]


def _duplicates_section(report: dict) -> list[str]:
    examples = report.get("duplicates") or []
    if not examples:
        return []
    rows = [[_cell(e.get("removed")), _cell(e.get("kept")), _cell(e.get("kind"))] for e in examples]
    return ["## Duplicate examples", "", *_table(["removed", "kept", "kind"], rows[:MAX_EXAMPLES_SHOWN]), ""]


def _splits_section(report: dict) -> list[str]:
    rows = [[split, _cell(count)] for split, count in (report.get("splits") or {}).items()]
    return ["## Splits", "", *_table(["split", "records"], rows), ""]


def _overlap_cell(value) -> str:
    return MISSING if value is None else f"{value:.3f}"


def _contamination_section(report: dict) -> list[str]:
    contamination = report.get("contamination")
    if contamination is None:
        return []
    found, dropped = _cell(contamination.get("found")), _cell(contamination.get("dropped"))
    lines = ["## Contamination", "",
             f"Validation and test records overlapping train: {found} found, {dropped} dropped.", ""]
    rows = [[_cell(e.get("split")), _cell(e.get("source")), _cell(e.get("kind")), _overlap_cell(e.get("overlap"))]
            for e in (contamination.get("examples") or [])[:MAX_EXAMPLES_SHOWN]]
    return lines + (_table(["split", "source", "kind", "overlap"], rows) + [""] if rows else [])


def _balance_section(balance: dict | None) -> list[str]:
    if balance is None:
        return []
    rows = [[_cell(label), str(balance.get("before", {}).get(label, 0)), str(balance.get("after", {}).get(label, 0))]
            for label in balance_labels(balance)]
    return ["## Class balance (training split)", "", *_table(["label", "before", "after"], rows), ""]


def _lengths_section(summary: dict, unit: str) -> list[str]:
    keys = ("count", "min", "mean", "p50", "p95", "max")
    rows = [[split, *(_cell(stats[key]) for key in keys)] for split, stats in summary["token_lengths"].items()]
    if not rows:
        return []
    return [f"## Record length ({unit})", "", *_table(["split", "records", *keys[1:]], rows), ""]


def _outputs_section(report: dict) -> list[str]:
    rows = [[split, _cell(out.get("path")), _cell(out.get("records")),
             f"`{out['sha256']}`" if out.get("sha256") else MISSING]
            for split, out in (report.get("outputs") or {}).items()]
    return ["## Outputs", "", *_table(["split", "path", "records", "sha256"], rows), "",
            "sha256 is over canonical JSON lines (sorted keys, compact), as in each file's .sha256.", ""]


def _throughput_section(report: dict) -> list[str]:
    seconds, rate = report.get("seconds"), report.get("records_per_second")
    seconds_text = MISSING if seconds is None else f"{seconds:.1f}"
    rate_text = MISSING if rate is None else f"{rate:.1f}"
    return ["## Throughput", "",
            f"{_cell(report.get('records_in'))} records in {seconds_text} s ({rate_text} records/s).", ""]


def _plots_section(plot_names: list[str]) -> list[str]:
    if not plot_names:
        return []
    lines = ["## Plots", ""]
    for name in plot_names:
        lines += [f"![{Path(name).stem.replace('_', ' ')}]({name})", ""]
    return lines


def render_prepare_report(report: dict, plot_names: list[str]) -> str:
    """The text of report.md; plot_names are PNG file names in the same directory."""
    summary = report_summary(report)
    lines = ["# Data preparation report", ""]
    lines += _inputs_section(report) + _steps_section("Record steps", report.get("steps", []))
    lines += _masked_section(report) + _duplicates_section(report) + _splits_section(report)
    lines += _contamination_section(report) + _steps_section("Training split steps", report.get("train_steps", []))
    lines += _balance_section(report.get("balance")) + _lengths_section(summary, length_unit(report))
    lines += _outputs_section(report) + _throughput_section(report) + _plots_section(plot_names)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_prepare_report(report: dict, out_dir: Path) -> list[Path]:
    """Write report.json, token_lengths.png (when any split has records), balance.png (with labels), report.md.

    Returns the written paths in that order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report_summary(report), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    written = [json_path]
    if plot_token_lengths(report, out_dir / "token_lengths.png"):
        written.append(out_dir / "token_lengths.png")
    if report.get("balance") is not None:
        plot_balance(report["balance"], out_dir / "balance.png")
        written.append(out_dir / "balance.png")
    markdown_path = out_dir / "report.md"
    markdown_path.write_text(render_prepare_report(report, [path.name for path in written[1:]]), encoding="utf-8")
    return written + [markdown_path]
