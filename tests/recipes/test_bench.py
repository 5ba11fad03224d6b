"""`dsft bench --suite tiny` end to end on CPU: B0, B1 (TRL) and dsft on the same data, gated, table and JSON."""

import json

import pytest
from typer.testing import CliRunner

from dsft.cli import app


def test_bench_tiny_runs_every_recipe_behind_the_gate(tmp_path):
    out = tmp_path / "bench_tiny.json"
    result = CliRunner().invoke(app, ["bench", "--suite", "tiny", "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output and "MFU@989" in result.output
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [s["name"] for s in report["setups"]] == ["a-tiny-lora", "d-tiny-moe-lora"]
    for setup in report["setups"]:
        rows = setup["recipes"]
        assert list(rows) == ["B0", "B1", "dsft"]
        for recipe, row in rows.items():
            assert row["status"] == "ok" and row["gate"] is None, (setup["name"], recipe, row.get("reason"))
            assert row["tokens_per_s"] > 0 and len(row["losses"]) == len(row["grad_norms"]) == 3
            assert abs(row["mean_loss"] - rows["B0"]["mean_loss"]) <= 0.01 * rows["B0"]["mean_loss"]
            assert row["vs_B0"] == row["tokens_per_s"] / rows["B0"]["tokens_per_s"]
        assert "chunked loss on" in rows["dsft"]["settings"]["speed_plan"]
    moe = report["setups"][1]["recipes"]
    assert "experts grouped_mm" in moe["dsft"]["settings"]["speed_plan"] and moe["B0"]["settings"]["experts"] == "grouped_mm"


def test_bench_profile_says_where_each_recipes_measured_steps_spend_their_time(tmp_path):
    out = tmp_path / "bench_tiny.json"
    result = CliRunner().invoke(app, ["bench", "--suite", "tiny", "--setup", "a", "--profile", "--output", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text(encoding="utf-8"))["setups"][0]["recipes"]
    for recipe, row in rows.items():
        profile = row["profile"]
        assert profile["device"] == "cpu" and profile["busy_fraction"] is None
        assert sum(profile["categories"].values()) == pytest.approx(1.0)
        assert profile["categories"]["matmul"] > 0.05 and profile["categories"]["attention"] > 0
        assert any(top["name"] == "aten::mm" for top in profile["top"])
        assert f"profile a-tiny-lora {recipe}: limited by {profile['limited_by']}" in result.output


def test_larger_packed_rows_keep_every_recipe_behind_the_gate(tmp_path):
    out = tmp_path / "bench_rows.json"
    result = CliRunner().invoke(app, ["bench", "--suite", "tiny", "--setup", "a", "--row-tokens", "128", "--output",
                                      str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (setup,) = json.loads(out.read_text(encoding="utf-8"))["setups"]
    assert (setup["row_tokens"], setup["b0_accumulation"]) == (128, 2)
    rows = setup["recipes"]
    assert rows["B0"]["settings"]["batching"] == "padded batches of 4, 2 accumulated per step"
    assert rows["dsft"]["settings"]["batching"] == "dsft bfd packing, padding-free rows of 128 tokens"
    for recipe, row in rows.items():
        assert row["status"] == "ok", (recipe, row.get("reason"))
        assert len(row["losses"]) == 3 and row["real_tokens"] > 3 * 64  # a step holds more than one 64-token row


def test_the_method_table_script_runs_and_writes_its_table(tmp_path):
    """benchmarks/methods.py, as short as it goes (no base training, 2 steps, two methods): each method in its own
    process, the JSON and the markdown table written (the numbers are the README's, from a full run)."""
    import subprocess
    import sys

    out = tmp_path / "methods.json"
    process = subprocess.run([sys.executable, "benchmarks/methods.py", "--methods", "full,lora", "--base-steps", "0",
                              "--steps", "2", "--max-length", "32", "--batch-size", "4", "--work", str(tmp_path / "w"),
                              "--output", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert process.returncode == 0, process.stderr[-2000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report["results"]) == {"full", "lora"} and all("error" not in r for r in report["results"].values())
    lora, full = report["results"]["lora"], report["results"]["full"]
    assert lora["trainable_parameters"] < full["trainable_parameters"] == full["total_parameters"]
    assert lora["peak_memory_bytes"] > 0 and lora["tokens_per_second"] > 0
    assert "| lora |" in out.with_suffix(".md").read_text(encoding="utf-8")
