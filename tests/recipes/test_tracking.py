"""tracking.mlflow end to end: the real CLI logs to a real MLflow store (the embedded SQLite default, and an
`mlflow server` started on loopback), read back with MLflow's own client."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from dsft.cli import app
from dsft.config import load_config
from dsft.data.fingerprint import Fingerprint
from dsft.data.read import read_records
from dsft.train.tracking import TRACKING_FILE, flat_params
from tests.recipes.conftest import make_config, read_metrics

pytest.importorskip("mlflow")


def _train(tmp_path: Path, tiny_data: dict, tracking: dict, **sections):
    config = make_config(tmp_path, tiny_data, model={"preset": "tiny-qwen2"},
                         method={"type": "lora", "lora": {"r": 4, "alpha": 8}},
                         train={"max_steps": 4, "logging_steps": 1}, output={"dir": str(tmp_path / "runs" / "a")},
                         tracking={"mlflow": {"enabled": True, **tracking}}, **sections)
    return CliRunner().invoke(app, ["train", str(config)]), tmp_path / "runs" / "a", config


def _run_of(run_dir: Path):
    from mlflow.tracking import MlflowClient

    saved = json.loads((run_dir / TRACKING_FILE).read_text())
    client = MlflowClient(saved["tracking_uri"])
    return client, client.get_run(saved["run_id"])


def _assert_mirrors_the_run_directory(run_dir: Path, config_path: Path, tiny_data: dict) -> None:
    client, run = _run_of(run_dir)
    assert run.info.status == "FINISHED" and run.data.tags["dsft.stage"] == "sft"
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
        logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-12)) for r in records if key in r], key
    # The resolved config (the run's config.yaml: the chat template resolved), every key.
    assert run.data.params == flat_params(load_config(run_dir / "config.yaml"))
    assert load_config(config_path).data.chat_template == "auto" and run.data.params["data.chat_template"] != "auto"
    assert run.data.params["train.learning_rate"] == "0.003" and run.data.params["method.lora.r"] == "4"
    digest = Fingerprint()
    for record in read_records(tiny_data["train"]):
        digest.update(record.data)
    (dataset_input,) = run.inputs.dataset_inputs
    assert json.loads(dataset_input.dataset.source)["sha256"] == digest.hexdigest()
    assert dataset_input.tags[0].value == "training"
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "metrics.jsonl"} <= artifacts
    assert not any(name.endswith(".safetensors") or name.startswith("tokenizer") for name in artifacts)


def test_the_embedded_store_holds_what_the_run_directory_holds(tmp_path, tiny_data):
    result, run_dir, config = _train(tmp_path, tiny_data, {})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "mlflow.db").is_file() and (tmp_path / "runs" / "mlartifacts").is_dir()
    _assert_mirrors_the_run_directory(run_dir, config, tiny_data)
    # What --resume does when the stage starts again: the same MLflow run, running again, then finished.
    from rich.console import Console

    from dsft.train.tracking import start_tracking

    _, run = _run_of(run_dir)
    tracker = start_tracking(load_config(run_dir / "config.yaml"), run_dir, {}, Console(quiet=True))
    assert tracker.run_id == run.info.run_id and _run_of(run_dir)[1].info.status == "RUNNING"
    tracker.finish(run_dir)
    assert _run_of(run_dir)[1].info.status == "FINISHED"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination",
               str(store / "artifacts"), "--workers", "1"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert server.poll() is None, server.stderr.read()[-2000:]
        time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("mlflow server did not answer /health in 90 s")
    yield uri
    server.terminate()
    server.wait(timeout=30)


def test_a_team_server_on_loopback_gets_the_same(tmp_path, tiny_data, mlflow_server):
    result, run_dir, config = _train(tmp_path, tiny_data, {"tracking_uri": mlflow_server, "experiment": "team"})
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    _assert_mirrors_the_run_directory(run_dir, config, tiny_data)
    client, run = _run_of(run_dir)
    assert client.get_experiment(run.info.experiment_id).name == "team"


def test_a_stage_that_fails_ends_its_mlflow_run_as_failed(tmp_path, tiny_data):
    guard = {"collapse_imbalance": 1.01, "collapse_windows": 1, "on_collapse": "stop"}
    config = make_config(tmp_path, tiny_data, method={"type": "full", "moe": guard},
                         train={"max_steps": 4, "logging_steps": 1}, output={"dir": str(tmp_path / "runs" / "a")},
                         tracking={"mlflow": {"enabled": True}})
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code != 0 and "the routing collapsed" in str(result.exception)
    _, run = _run_of(tmp_path / "runs" / "a")
    assert run.info.status == "FAILED" and run.data.metrics["moe_load_imbalance"] > 1.01
