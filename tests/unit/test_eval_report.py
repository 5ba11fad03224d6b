"""report.md, the summary table and the PNG plots of `dsft eval`, from a hand-written results dict."""

import copy
import json

import pytest
from rich.console import Console

from dsft.eval.report import (
    escape_cell,
    format_metric,
    plot_length_distribution,
    plot_loss_curves,
    plot_metric_bars,
    print_summary,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _model(name: str, metrics: dict, ci: dict, lengths: list[int], ttft_ms: float) -> dict:
    return {
        "name": name,
        "identity": {"path": f"/abs/{name}", "kind": "run", "weights_sha256": "0123456789abcdef" * 4},
        "metrics": metrics,
        "ci": ci,
        "unavailable": {"semantic_similarity": "eval.embedding_model not set"},
        "speed": {"device": "cpu", "dtype": "float32", "time_to_first_token_ms": ttft_ms, "ms_per_token_batch1": 4.56,
                  "tokens_per_second_batch1": 222.0, "batch_size": 8, "tokens_per_second_batch": 900.04,
                  "peak_memory_bytes": 550_000_000},
        "output_lengths_tokens": lengths,
    }


@pytest.fixture
def results() -> dict:
    target_metrics = {"exact_match": 0.88, "f1": 0.9, "bleu": 41.2, "chrf": 60.1, "rougeL": 0.8, "perplexity": 1.9}
    against_metrics = {"exact_match": 0.5, "f1": 0.62345, "bleu": 12.345, "chrf": 40.0, "rougeL": 0.4, "perplexity": 1234.5}
    return {
        "dsft_version": "0.1.0",
        "created": "2026-11-24T01:00:00Z",
        "data": {"path": "data/test.jsonl", "sha256": "feedbeefcafe0000" * 4, "format": "alpaca",
                 "examples": 100, "with_reference": 98},
        "decoding": {"max_new_tokens": 64, "do_sample": False, "batch_size": 16, "seed": 0},
        "notes": ["BLEU tokenize=zh (references mostly Chinese)"],
        "models": {
            "target": _model("runs/quickstart", target_metrics, {"exact_match": [0.81, 0.94], "bleu": [35.0, 47.0]},
                             [3, 4, 5, 5, 6, 7], 12.34),
            "against": _model("deepseek-ai/base", against_metrics, {"exact_match": [0.4, 0.6]},
                              [10, 20, 30, 40, 64], 10.0),
        },
        "differences": {"exact_match": 0.38, "f1": 0.27655, "bleu": 28.855, "chrf": 20.1, "rougeL": 0.4,
                        "perplexity": -1232.6},
        "examples": [
            {"index": 0, "prompt": "What is 1000 | 2000?", "reference": "3000", "target": "3000", "against": "12",
             "scores": {"target": {"f1": 1.0}, "against": {"f1": 0.0}}},
            {"index": 5, "prompt": "long " * 200, "reference": None, "target": "<think>x</think>a\nb", "against": "c",
             "scores": {"target": {"f1": 1.0}, "against": {"f1": 0.0}}},
            {"index": 7, "prompt": "Name a color", "reference": "red", "target": "blue", "against": "red",
             "scores": {"target": {"f1": 0.0}, "against": {"f1": 1.0}}},
        ],
        "won": [0, 5],
        "lost": [7],
    }


@pytest.fixture
def target_only(results) -> dict:
    single = copy.deepcopy(results)
    del single["models"]["against"], single["differences"], single["won"], single["lost"]
    return single


def _assert_png(path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.shape[0] > 0 and pixels.shape[1] > 0


# ---------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("metric", "value", "signed", "expected"),
    [
        ("exact_match", 0.88, False, "0.880"),
        ("f1", 0.27655, True, "+0.277"),
        ("f1", -0.1, True, "-0.100"),
        ("bleu", 41.2, False, "41.20"),
        ("chrf", 12.345, False, "12.35"),
        ("perplexity", 1.9, False, "1.90"),
        ("perplexity", 12.345, False, "12.3"),
        ("perplexity", 1234.5, False, "1234"),
        ("perplexity", -1232.6, True, "-1233"),
        ("perplexity", 0.5, True, "+0.500"),
        ("exact_match", None, False, "—"),
    ],
)
def test_format_metric(metric, value, signed, expected):
    assert format_metric(metric, value, signed=signed) == expected


def test_escape_cell_truncates_and_escapes():
    assert escape_cell("a|b\nc <think>") == "a\\|b<br>c &lt;think&gt;"
    assert escape_cell("x" * 400) == "x" * 300 + " …"
    assert escape_cell(None) == "—"


# ---------------------------------------------------------------- report.md


def test_report_metrics_table_rows(results, tmp_path):
    text = write_report(results, tmp_path, []).read_text(encoding="utf-8")
    assert "| metric | target | against | difference |" in text
    assert "| exact_match | 0.880 [0.810, 0.940] | 0.500 [0.400, 0.600] | +0.380 |" in text
    assert "| f1 | 0.900 | 0.623 | +0.277 |" in text
    assert "| bleu | 41.20 [35.00, 47.00] | 12.35 | +28.86 |" in text
    assert "| chrf | 60.10 | 40.00 | +20.10 |" in text
    assert "| perplexity | 1.90 | 1234 | -1233 |" in text


def test_report_header_sections(results, tmp_path):
    text = write_report(results, tmp_path, []).read_text(encoding="utf-8")
    assert text.startswith("# Evaluation report\n")
    assert "- path: `data/test.jsonl` (format alpaca)" in text
    assert "- sha256: `feedbeefcafe`" in text
    assert "- examples: 100, with reference: 98" in text
    assert "- **target**: `runs/quickstart` — path `/abs/runs/quickstart`, kind `run`, weights sha256 `0123456789ab`" in text
    assert "`max_new_tokens=64`, `do_sample=false`, `batch_size=16`, `seed=0`" in text
    assert "- BLEU tokenize=zh (references mostly Chinese)" in text
    assert "- `semantic_similarity` (target, against): eval.embedding_model not set" in text


def test_report_speed_table(results, tmp_path):
    text = write_report(results, tmp_path, []).read_text(encoding="utf-8")
    assert "|  | target | against |" in text
    assert "| device | cpu | cpu |" in text
    assert "| dtype | float32 | float32 |" in text
    assert "| time to first token (ms) | 12.3 | 10.0 |" in text
    assert "| ms per token, batch 1 | 4.6 | 4.6 |" in text
    assert "| tokens/s, batch | 900.0 | 900.0 |" in text
    assert "| peak memory (MiB) | 524.5 | 524.5 |" in text


def test_report_links_plots_relative(results, tmp_path):
    plots = ["loss_curves.png", str(tmp_path / "plots" / "metric_bars.png")]
    text = write_report(results, tmp_path, plots).read_text(encoding="utf-8")
    assert "![loss curves](loss_curves.png)" in text
    assert "![metric bars](plots/metric_bars.png)" in text


def test_report_won_and_lost_examples(results, tmp_path):
    text = write_report(results, tmp_path, []).read_text(encoding="utf-8")
    assert "## Won: target better than against (2)" in text
    assert "| 0 | What is 1000 \\| 2000? | 3000 | 3000 | 12 |" in text
    truncated_prompt = ("long " * 200)[:300].rstrip() + " …"
    assert f"| 5 | {truncated_prompt} | — | &lt;think&gt;x&lt;/think&gt;a<br>b | c |" in text
    assert "## Lost: target worse than against (1)" in text
    assert "| 7 | Name a color | red | blue | red |" in text


def test_report_without_against_has_no_comparison(target_only, tmp_path):
    text = write_report(target_only, tmp_path, []).read_text(encoding="utf-8")
    assert "| metric | target |\n" in text
    assert "| exact_match | 0.880 [0.810, 0.940] |\n" in text
    assert "|  | target |\n" in text
    for absent in ("against", "difference", "Won", "Lost"):
        assert absent not in text


# ---------------------------------------------------------------- terminal


def test_print_summary_table(results, target_only):
    console = Console(record=True, width=140)
    print_summary(results, console)
    text = console.export_text()
    for cell in ("exact_match", "0.880 [0.810, 0.940]", "+0.380", "1234", "-1233", "difference", "semantic_similarity"):
        assert cell in text
    console = Console(record=True, width=140)
    print_summary(target_only, console)
    assert "difference" not in console.export_text()


# ---------------------------------------------------------------- plots


def test_plot_loss_curves(tmp_path):
    metrics_jsonl = tmp_path / "metrics.jsonl"
    records = [{"step": step, "loss": 3.0 / step, "learning_rate": 1e-4} for step in range(1, 21)]
    records += [{"step": 10, "eval_loss": 0.5}, {"step": 20, "eval_loss": 0.4}, {"step": 20, "train_runtime": 9.0}]
    metrics_jsonl.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 21, "lo', encoding="utf-8")
    out_png = tmp_path / "plots" / "loss_curves.png"
    assert plot_loss_curves(metrics_jsonl, out_png) is True
    _assert_png(out_png)


def test_plot_loss_curves_without_losses(tmp_path):
    out_png = tmp_path / "loss_curves.png"
    assert plot_loss_curves(tmp_path / "missing.jsonl", out_png) is False
    no_loss = tmp_path / "metrics.jsonl"
    no_loss.write_text('{"step": 1, "learning_rate": 0.001}\n', encoding="utf-8")
    assert plot_loss_curves(no_loss, out_png) is False
    assert not out_png.exists()


def test_plot_metric_bars(results, target_only, tmp_path):
    for name, case in (("two", results), ("one", target_only)):
        out_png = tmp_path / f"{name}.png"
        assert plot_metric_bars(case, out_png) is True
        _assert_png(out_png)


def test_plot_metric_bars_without_metrics(target_only, tmp_path):
    target_only["models"]["target"]["metrics"] = {}
    assert plot_metric_bars(target_only, tmp_path / "bars.png") is False
    assert not (tmp_path / "bars.png").exists()


def test_plot_length_distribution(results, target_only, tmp_path):
    out_png = tmp_path / "lengths.png"
    assert plot_length_distribution(results, out_png) is True
    _assert_png(out_png)
    target_only["models"]["target"]["output_lengths_tokens"] = []
    assert plot_length_distribution(target_only, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()
