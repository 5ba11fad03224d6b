"""The human side of `dsft eval`: PNG plots, report.md and a terminal summary, all from results.json.

Everything here reads the results dict the evaluation stage wrote (and a run's metrics.jsonl);
nothing recomputes a score, so the report, the terminal and results.json always agree.
Plots use matplotlib's object API (Figure + the Agg canvas): no pyplot, no global state, no display.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from dsft.eval.classification import classification_markdown
from dsft.markdown import MISSING, escape_cell
from dsft.plots import new_figure, overlaid_histograms, save_png

ROLES = ("target", "against")
ROLE_COLORS = {"target": "tab:blue", "against": "tab:orange"}
HUNDRED_SCALE_METRICS = ("bleu", "chrf")
"""Metrics reported on 0..100 (sacrebleu's convention); every other metric but perplexity is on 0..1."""
PERPLEXITY_METRICS = ("perplexity",)
MAX_EXAMPLES_SHOWN = 10
"""Won and lost examples shown each; results.json keeps them all."""
SHA256_SHORT_CHARS = 12
LOG_SCALE_RATIO = 30
"""Perplexity bars switch to a log axis when the largest is this many times the smallest."""


# ---------------------------------------------------------------- number formatting


def metric_scale(metric: str) -> str:
    """'hundred' for bleu/chrf, 'perplexity' for perplexity, 'unit' (0..1) for every other metric."""
    if metric in HUNDRED_SCALE_METRICS:
        return "hundred"
    if metric in PERPLEXITY_METRICS:
        return "perplexity"
    return "unit"


def _three_significant(value: float) -> str:
    # '#' keeps trailing zeros (1.90, not 1.9); from 100 up whole numbers avoid 1.23e+03.
    if not math.isfinite(value) or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:#.3g}".rstrip(".")


def format_metric(metric: str, value: float | None, signed: bool = False) -> str:
    """A metric's value as the report shows it: 0..1 with 3 decimals, bleu/chrf with 2, perplexity 3 significant."""
    if value is None:
        return MISSING
    scale = metric_scale(metric)
    if scale == "perplexity":
        text = _three_significant(value)
        return f"+{text}" if signed and value >= 0 else text
    sign = "+" if signed else ""
    decimals = 2 if scale == "hundred" else 3
    return f"{value:{sign}.{decimals}f}"


def _format_with_ci(metric: str, value: float | None, ci: list | None) -> str:
    text = format_metric(metric, value)
    if value is None or not ci:
        return text
    low, high = ci
    return f"{text} [{format_metric(metric, low)}, {format_metric(metric, high)}]"


# ---------------------------------------------------------------- shared table rows


def compared_roles(results: dict) -> tuple[str, ...]:
    """("target",) or ("target", "against") when results compare two models."""
    return tuple(role for role in ROLES if role in results["models"])


def metric_names(results: dict) -> list[str]:
    """Metrics of every model, in the order the target reports them (then any the target lacks)."""
    names: list[str] = []
    for role in compared_roles(results):
        names += [name for name in results["models"][role].get("metrics", {}) if name not in names]
    return names


def metric_rows(results: dict) -> list[list[str]]:
    """One row per metric: name, each model's value [CI], and with two models the difference."""
    roles = compared_roles(results)
    differences = results.get("differences", {})
    rows = []
    for metric in metric_names(results):
        row = [metric]
        for role in roles:
            model = results["models"][role]
            row.append(_format_with_ci(metric, model.get("metrics", {}).get(metric), model.get("ci", {}).get(metric)))
        if len(roles) == 2:
            row.append(format_metric(metric, differences.get(metric), signed=True))
        rows.append(row)
    return rows


def metric_header(results: dict) -> list[str]:
    """Column names matching metric_rows."""
    roles = compared_roles(results)
    return ["metric", *roles, *(["difference"] if len(roles) == 2 else [])]


# ---------------------------------------------------------------- plots






def _read_losses(metrics_jsonl: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) and (step, validation loss) pairs from a run's metrics.jsonl."""
    train, validation = [], []
    for line in metrics_jsonl.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a torn last line; the plot still shows the rest
        if not isinstance(record, dict) or "step" not in record:
            continue
        if isinstance(record.get("loss"), (int, float)):
            train.append((record["step"], float(record["loss"])))
        if isinstance(record.get("eval_loss"), (int, float)):
            validation.append((record["step"], float(record["eval_loss"])))
    return train, validation


def plot_loss_curves(metrics_jsonl: Path, out_png: Path) -> bool:
    """Training and validation loss against optimizer step on one axes.

    Returns False, writing nothing, when metrics_jsonl is missing or holds no loss records.
    """
    metrics_jsonl, out_png = Path(metrics_jsonl), Path(out_png)
    if not metrics_jsonl.is_file():
        return False
    train, validation = _read_losses(metrics_jsonl)
    if not train and not validation:
        return False
    figure = new_figure(7.0, 4.0)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), color="tab:blue", linewidth=1.5, label="training loss")
    if validation:
        axes.plot(*zip(*validation), color="tab:red", marker="o", linewidth=1.5, label="validation loss")
    axes.set(xlabel="step", ylabel="loss", title="Loss")
    axes.grid(alpha=0.3)
    axes.legend()
    save_png(figure, out_png)
    return True


def _finite(value) -> float:
    # A missing or non-finite value becomes NaN, which matplotlib leaves undrawn.
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return math.nan


def _scale_groups(results: dict) -> dict[str, list[str]]:
    """Plottable metrics (a finite value in some model) grouped by scale, each group non-empty."""
    groups: dict[str, list[str]] = {}
    for metric in metric_names(results):
        values = [_finite(results["models"][role].get("metrics", {}).get(metric)) for role in compared_roles(results)]
        if any(math.isfinite(value) for value in values):
            groups.setdefault(metric_scale(metric), []).append(metric)
    return {scale: groups[scale] for scale in ("unit", "hundred", "perplexity") if scale in groups}


def _error_bars(values: list[float], cis: list) -> list[list[float]]:
    """matplotlib's yerr rows (below, above) from [low, high] intervals; NaN (no whisker) where a metric has none."""
    below, above = [], []
    for value, ci in zip(values, cis):
        has_ci = bool(ci) and math.isfinite(value)
        # max(0, ...) because matplotlib rejects negative error lengths (an interval not containing its value)
        below.append(max(0.0, value - ci[0]) if has_ci else math.nan)
        above.append(max(0.0, ci[1] - value) if has_ci else math.nan)
    return [below, above]


def _draw_bar_group(axes, results: dict, metrics: list[str], scale: str) -> None:
    roles = compared_roles(results)
    bar_width = 0.8 / len(roles)
    for position, role in enumerate(roles):
        model = results["models"][role]
        values = [_finite(model.get("metrics", {}).get(metric)) for metric in metrics]
        cis = [model.get("ci", {}).get(metric) for metric in metrics]
        offsets = [index + (position - (len(roles) - 1) / 2) * bar_width for index in range(len(metrics))]
        bars = axes.bar(offsets, values, bar_width, yerr=_error_bars(values, cis), capsize=3,
                        color=ROLE_COLORS[role], label=f"{role}: {model.get('name', role)}")
        labels = ["" if math.isnan(v) else format_metric(m, v) for m, v in zip(metrics, values)]
        axes.bar_label(bars, labels=labels, fontsize=7, padding=2)
    axes.set_xticks(range(len(metrics)), metrics, rotation=30, ha="right")
    axes.grid(axis="y", alpha=0.3)
    _set_value_limits(axes, scale)


def _set_value_limits(axes, scale: str) -> None:
    # Fixed ranges make two reports comparable at a glance; headroom keeps the bar labels inside.
    low, high = axes.get_ylim()
    if scale == "unit":
        axes.set_ylim(min(0.0, low), max(1.12, high))
        axes.set_ylabel("score (0..1)")
    elif scale == "hundred":
        axes.set_ylim(0.0, max(110.0, high))
        axes.set_ylabel("score (0..100)")
    else:
        axes.set_ylabel("perplexity (lower is better)")
        values = [bar.get_height() for bar in axes.patches if math.isfinite(bar.get_height())]
        if min(values) > 0 and max(values) / min(values) > LOG_SCALE_RATIO:
            axes.set_yscale("log")  # a base model's 1000 next to a tuned 1.9 would leave the 1.9 bar invisible
            axes.set_ylim(min(values) / 2, max(values) * 4)
        else:
            axes.set_ylim(0.0, high * 1.12)


def plot_metric_bars(results: dict, out_png: Path) -> bool:
    """Grouped bars, one per model and metric, with CI whiskers where results have intervals.

    0..1 metrics, 0..100 metrics (bleu, chrf) and perplexity get separate subplots so small values
    stay visible. Returns False, writing nothing, when no model has a finite metric.
    """
    groups = _scale_groups(results)
    if not groups:
        return False
    widths = [max(len(metrics), 1.5) for metrics in groups.values()]
    figure = new_figure(min(4.0 + 0.9 * sum(widths), 16.0), 4.5)
    all_axes = figure.subplots(1, len(groups), squeeze=False, width_ratios=widths)[0]
    for axes, (scale, metrics) in zip(all_axes, groups.items()):
        _draw_bar_group(axes, results, metrics, scale)
    handles, labels = all_axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside upper center", ncols=len(labels))
    save_png(figure, Path(out_png))
    return True




def plot_length_distribution(results: dict, out_png: Path) -> bool:
    """Overlaid, semi-transparent histograms of each model's output length in tokens.

    Returns False, writing nothing, when no model has output lengths.
    """
    lengths_by_role = {
        role: results["models"][role].get("output_lengths_tokens") or [] for role in compared_roles(results)
    }
    lengths_by_role = {role: lengths for role, lengths in lengths_by_role.items() if lengths}
    if not lengths_by_role:
        return False
    groups = {f"{role}: {results['models'][role].get('name', role)}": (lengths, ROLE_COLORS[role])
              for role, lengths in lengths_by_role.items()}
    overlaid_histograms(groups, ("output length (tokens)", "examples", "Output length"), Path(out_png))
    return True


# ---------------------------------------------------------------- report.md


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _short_sha(value) -> str:
    return f"`{str(value)[:SHA256_SHORT_CHARS]}`" if value else MISSING


def _data_section(data: dict) -> list[str]:
    return [
        "## Data",
        "",
        f"- path: `{data.get('path', MISSING)}` (format {data.get('format', MISSING)})",
        f"- sha256: {_short_sha(data.get('sha256'))}",
        f"- examples: {data.get('examples', MISSING)}, with reference: {data.get('with_reference', MISSING)}",
        "",
    ]


def _identity_text(identity: dict) -> str:
    parts = []
    for key, value in identity.items():
        shown = _short_sha(value) if key.endswith("sha256") else f"`{value}`"
        parts.append(f"{key.replace('_', ' ')} {shown}")
    return ", ".join(parts)


def _models_section(results: dict) -> list[str]:
    lines = ["## Models", ""]
    for role in compared_roles(results):
        model = results["models"][role]
        identity = _identity_text(model.get("identity", {}))
        lines.append(f"- **{role}**: `{model.get('name', MISSING)}`" + (f" — {identity}" if identity else ""))
    return lines + [""]


def _decoding_section(results: dict) -> list[str]:
    decoding = results.get("decoding", {})
    settings = ", ".join(f"`{key}={json.dumps(value)}`" for key, value in decoding.items())
    lines = ["## Decoding", "", settings or MISSING, ""]
    if results.get("notes"):
        lines += ["## Notes", "", *(f"- {escape_cell(note, max_chars=1000)}" for note in results["notes"]), ""]
    return lines


def _unavailable_lines(results: dict) -> list[str]:
    """'- metric: reason (roles)' lines; a reason both models share is listed once."""
    roles_by_reason: dict[tuple[str, str], list[str]] = {}
    for role in compared_roles(results):
        for metric, reason in results["models"][role].get("unavailable", {}).items():
            roles_by_reason.setdefault((metric, reason), []).append(role)
    return [f"- `{metric}` ({', '.join(roles)}): {reason}" for (metric, reason), roles in roles_by_reason.items()]


def _metrics_section(results: dict) -> list[str]:
    lines = ["## Metrics", ""]
    rows = metric_rows(results)
    lines += _table(metric_header(results), rows) if rows else ["No metric was computed."]
    lines.append("")
    if any(results["models"][role].get("ci") for role in compared_roles(results)):
        lines += ["Brackets hold bootstrap confidence intervals [low, high].", ""]
    unavailable = _unavailable_lines(results)
    if unavailable:
        lines += ["### Unavailable metrics", "", *unavailable, ""]
    return lines


def _one_decimal(value) -> str:
    return MISSING if value is None else f"{value:.1f}"


SPEED_ROWS = (
    ("device", "device", lambda v: MISSING if v is None else str(v)),
    ("dtype", "dtype", lambda v: MISSING if v is None else str(v)),
    ("time to first token (ms)", "time_to_first_token_ms", _one_decimal),
    ("ms per token, batch 1", "ms_per_token_batch1", _one_decimal),
    ("tokens/s, batch 1", "tokens_per_second_batch1", _one_decimal),
    ("batch size", "batch_size", lambda v: MISSING if v is None else str(v)),
    ("tokens/s, batch", "tokens_per_second_batch", _one_decimal),
    ("peak memory (MiB)", "peak_memory_bytes", lambda v: MISSING if v is None else f"{v / 2**20:.1f}"),
)
"""(label, speed key, formatter) for each row of the speed table."""


def _speed_section(results: dict) -> list[str]:
    roles = [role for role in compared_roles(results) if results["models"][role].get("speed")]
    if not roles:
        return []
    rows = [
        [label, *(formatter(results["models"][role]["speed"].get(key)) for role in roles)]
        for label, key, formatter in SPEED_ROWS
    ]
    return ["## Speed", "", *_table(["", *roles], rows), "",
            "Greedy decoding at a fixed length after a warm-up; the median of a few repeats.", ""]


def _plots_section(plots: list[str], out_dir: Path) -> list[str]:
    if not plots:
        return []
    lines = ["## Plots", ""]
    for plot in plots:
        path = Path(plot)
        link = os.path.relpath(path, out_dir) if path.is_absolute() else path.as_posix()
        lines += [f"![{path.stem.replace('_', ' ')}]({Path(link).as_posix()})", ""]
    return lines


def _example_rows(results: dict, indexes: list[int]) -> list[list[str]]:
    by_index = {example["index"]: example for example in results.get("examples", [])}
    rows = []
    for index in indexes[:MAX_EXAMPLES_SHOWN]:
        example = by_index.get(index)
        if example is None:
            continue
        texts = (example.get(key) for key in ("prompt", "reference", "target", "against"))
        rows.append([str(index), *(escape_cell(text) for text in texts)])
    return rows


def _examples_section(results: dict, key: str, title: str) -> list[str]:
    indexes = results.get(key, [])
    lines = [f"## {title} ({len(indexes)})", ""]
    if not indexes:
        return lines + ["None.", ""]
    header = ["#", "prompt", "reference", "target", "against"]
    lines += _table(header, _example_rows(results, indexes))
    if len(indexes) > MAX_EXAMPLES_SHOWN:
        lines.append(f"\n…and {len(indexes) - MAX_EXAMPLES_SHOWN} more in results.json.")
    return lines + [""]


def render_report(results: dict, out_dir: Path, plots: list[str]) -> str:
    """The text of report.md; comparison sections appear only when results hold an 'against' model."""
    created = results.get("created", MISSING)
    lines = ["# Evaluation report", "", f"dsft {results.get('dsft_version', MISSING)}, {created}", ""]
    lines += _data_section(results.get("data", {})) + _models_section(results) + _decoding_section(results)
    lines += _metrics_section(results) + classification_markdown(results)
    lines += _speed_section(results) + _plots_section(plots, Path(out_dir))
    if "against" in results["models"]:
        lines += _examples_section(results, "won", "Won: target better than against")
        lines += _examples_section(results, "lost", "Lost: target worse than against")
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(results: dict, out_dir: Path, plots: list[str]) -> Path:
    """Write out_dir/report.md and return its path; plots are PNG paths (relative to out_dir, or absolute)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text(render_report(results, out_dir, plots), encoding="utf-8")
    return path


# ---------------------------------------------------------------- terminal


def print_summary(results: dict, console) -> None:
    """Print the report's metrics table (and unavailable metrics) as a rich Table on console."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Evaluation")
    for index, column in enumerate(metric_header(results)):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in metric_rows(results):
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)
    for line in _unavailable_lines(results):
        console.print(escape(line.replace("`", "")), style="dim")
