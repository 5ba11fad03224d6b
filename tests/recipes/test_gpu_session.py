"""benchmarks/gpu_session.sh, the one prepared script a session with a lent GPU runs, rehearsed on CPU
(DSFT_REHEARSAL=1: the tiny bench suite and a tiny preset), so a broken step is found here and not in device time."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def session(tmp_path: Path, *steps: str, budget_s: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "DSFT_REHEARSAL": "1", "OUT": str(tmp_path / "out"), "BUDGET_S": str(budget_s),
           "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "benchmarks/gpu_session.sh", *steps], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_rehearsal_runs_the_steps_and_keeps_their_json(tmp_path):
    result = session(tmp_path, "varlen", "serve")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "session:   varlen rc=0" in result.stdout and "session:   serve rc=0" in result.stdout
    assert "dsft does not import" not in result.stdout and "session: torch " in result.stdout
    report = json.loads((tmp_path / "out" / "serve_throughput.json").read_text(encoding="utf-8"))
    assert report["shape"] == "tiny-qwen2" and [level["clients"] for level in report["levels"]] == [1, 4]
    assert all(level["ttft_p50_ms"] is not None for level in report["levels"])
    assert "session:   serve rc=0" in (tmp_path / "out" / "session.log").read_text(encoding="utf-8")


def test_steps_beyond_the_budget_are_skipped_and_unknown_steps_refused(tmp_path):
    result = session(tmp_path, "bench_d", "serve", budget_s=0)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "session:   bench_d skipped" in result.stdout and "session:   serve skipped" in result.stdout
    assert not (tmp_path / "out" / "bench_d.json").exists()
    refused = session(tmp_path, "bench_z")
    assert refused.returncode == 2 and "unknown step bench_z" in refused.stdout


def test_rehearsal_of_the_moe_telemetry_step_writes_its_overhead(tmp_path):
    result = session(tmp_path, "moe_telemetry")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "session:   moe_telemetry rc=0" in result.stdout
    report = json.loads((tmp_path / "out" / "moe_telemetry_v2_lite.json").read_text(encoding="utf-8"))
    assert report["shape"] == "tiny-deepseek-v3" and set(report["step_s_median"]) == {"off", "on", "no_hooks"}
    assert len(report["step_s_all"]["on"]) == len(report["step_s_all"]["off"]) == 2
