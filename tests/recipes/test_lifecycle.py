"""The registry and the regression gate end to end: the real CLI on two tiny trained runs (one right, one trained to
answer wrongly), MLflow's SQLite store read back with MLflow's own client."""

import json

import pytest
from typer.testing import CliRunner

from dsft.cli import app
from dsft.config import load_config
from dsft.data.fingerprint import Fingerprint
from dsft.data.read import read_records
from dsft.errors import DsftError
from dsft.train.tracking import TRACKING_FILE, flat_params
from tests.recipes.lifecycle_runs import train_lifecycle_runs

pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("lifecycle")
    trained = train_lifecycle_runs(root, tiny_data["train"])
    result = CliRunner().invoke(app, ["eval", str(trained["right"]), "--data", str(trained["test"])])
    assert result.exit_code == 0, result.output
    # The store the right run was tracked in (mlflow.db beside output.dir): registering links that MLflow run.
    trained["store"] = json.loads((trained["right"] / TRACKING_FILE).read_text())["tracking_uri"]
    return trained


def dsft(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_of(result) -> str:
    """The message of the DsftError a verb raised; `dsft` (main) prints it and exits with its code, 2."""
    assert isinstance(result.exception, DsftError) and result.exception.exit_code == 2, result.output
    return str(result.exception)


@pytest.fixture(scope="module")
def registered(runs):
    for name in ("right", "wrong"):
        result = dsft("registry", "register", runs[name], "--name", "support", "--store", runs["store"])
        assert result.exit_code == 0, result.output
    return runs


def _digest(path) -> str:
    digest = Fingerprint()
    for record in read_records(path):
        digest.update(record.data)
    return digest.hexdigest()


def test_a_version_holds_data_hyperparameters_and_evals(registered):
    from mlflow.tracking import MlflowClient

    from dsft.lifecycle.registry import Registry
    from dsft.lifecycle.registry_views import describe_version

    registry = Registry(registered["store"])
    right = describe_version(registry, "support@1")
    assert right["run_dir"] == str(registered["right"].resolve())
    assert right["data_fingerprints"] == {str(registered["right_data"]): _digest(registered["right_data"])}
    assert right["hyperparameters"] == flat_params(load_config(registered["right"] / "config.yaml"))
    # The tracked run is linked, not copied: the version's MLflow run is the one tracking.json names.
    assert right["mlflow_run"] == json.loads((registered["right"] / TRACKING_FILE).read_text())["run_id"]
    (evaluation,) = right["evaluations"].values()
    assert evaluation["metrics"]["exact_match"] == 1.0 and evaluation["examples"] == 16
    # dsft eval of the tracked run added its scores and report to the run's MLflow run.
    client = MlflowClient(registered["store"])
    assert client.get_run(right["mlflow_run"]).data.metrics["eval/test/exact_match"] == 1.0
    assert {"eval/eval/results.json", "eval/eval/report.md"} <= {
        a.path for a in client.list_artifacts(right["mlflow_run"], "eval/eval")}
    assert right["deployments"] == [] and right["retired"] is None
    # The untracked run got an MLflow run recorded from its directory: its config and its metrics.jsonl.
    wrong = describe_version(registry, "support@2")
    assert wrong["hyperparameters"] == flat_params(load_config(registered["wrong"] / "config.yaml"))
    records = [json.loads(line) for line in (registered["wrong"] / "metrics.jsonl").read_text().splitlines()]
    history = MlflowClient(registered["store"]).get_metric_history(wrong["mlflow_run"], "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in records
                                                   if "loss" in r]


def test_promote_retire_and_history(registered):
    store = registered["store"]
    assert dsft("registry", "promote", "support", "1", "--alias", "production", "--store", store).exit_code == 0
    assert dsft("registry", "promote", "support", "2", "--alias", "candidate", "--store", store).exit_code == 0
    shown = dsft("registry", "show", "support@candidate", "--store", store, "--json")
    assert json.loads(shown.output)["version"] == "2"
    retired = dsft("registry", "retire", "support", "2", "--reason", "answers wrongly", "--store", store)
    assert retired.exit_code == 0 and "aliases removed: candidate" in retired.output
    assert "retired (answers wrongly)" in error_of(dsft("registry", "promote", "support", "2", "--alias",
                                                        "production", "--store", store))
    assert "retired already" in error_of(dsft("registry", "retire", "support", "2", "--reason", "x", "--store", store))
    assert "no version at @candidate" in error_of(dsft("registry", "show", "support@candidate", "--store", store))
    forced = dsft("registry", "promote", "support", "2", "--alias", "candidate", "--force", "--store", store)
    assert forced.exit_code == 0
    from dsft.lifecycle.registry import Registry

    events = [(e["version"], e["kind"], e.get("alias")) for e in Registry(store).events("support")]
    assert events == [("1", "registered", None), ("2", "registered", None), ("1", "promoted", "production"),
                      ("2", "promoted", "candidate"), ("2", "retired", None), ("2", "promoted", "candidate")]
    assert json.loads(dsft("registry", "show", "support@2", "--store", store, "--json").output)["retired"]["reason"] \
        == "answers wrongly"


@pytest.mark.parametrize("args, message", [
    (("show", "support@9"), "has no version 9; versions: 1, 2"),
    (("show", "nope"), "no model named 'nope'; registered: support"),
    (("show", "bad name!"), "a registry reference is NAME"),
    (("promote", "support", "1", "--alias", "staging"), "--alias 'staging': one of production, candidate"),
    (("promote", "support", "one", "--alias", "production"), "VERSION 'one': a version number"),
    (("retire", "support", "1", "--reason", " "), "--reason: say why"),
])
def test_bad_registry_input_is_a_clear_error(registered, args, message):
    assert message in error_of(dsft("registry", *args, "--store", registered["store"]))


def test_a_run_registers_once_and_only_when_finished(registered, tmp_path):
    store = registered["store"]
    again = error_of(dsft("registry", "register", registered["wrong"], "--name", "support", "--store", store))
    assert "registered already as support version 2" in again
    (tmp_path / "config.yaml").write_text((registered["wrong"] / "config.yaml").read_text())
    assert "has not finished" in error_of(dsft("registry", "register", tmp_path, "--name", "x", "--store", store))


def _gate(runs, candidate, baseline, *extra):
    return dsft("gate", candidate, "--against", baseline, "--data", runs["test"], *extra)


def test_the_gate_passes_a_better_candidate_and_fails_a_real_drop(runs, tmp_path):
    passed = _gate(runs, runs["right"], runs["wrong"], "--metrics", "exact_match,f1", "--out", tmp_path / "up")
    assert passed.exit_code == 0, passed.output
    report = json.loads((tmp_path / "up" / "gate.json").read_text())
    assert report["verdict"] == "pass" and [m["drop_percent"] for m in report["metrics"]] == [-100.0, -100.0]
    # The right run's own dsft eval (same data, weights and settings) is reused, not run again.
    assert report["evals"]["candidate"] == str(runs["right"] / "eval")
    failed = _gate(runs, runs["wrong"], runs["right"], "--metrics", "exact_match", "--out", tmp_path / "down")
    assert failed.exit_code == 1, failed.output
    (verdict,) = json.loads((tmp_path / "down" / "gate.json").read_text())["metrics"]
    assert verdict["drop_percent"] == 100.0 and not verdict["passed"] and "a real drop" in verdict["why"]
    assert verdict["interval_percent"] == [-100.0, -100.0]
    assert "FAIL" in (tmp_path / "down" / "gate.md").read_text()


def test_the_gate_fails_on_any_check_case_that_regresses(runs, tmp_path):
    # exact_match may drop all the way (bound 100%), but the check suite's cases the baseline passed now fail.
    checks = '[{"name": "says_42", "regex": "42"}]'
    result = _gate(runs, runs["wrong"], runs["right"], "--metrics", "exact_match", "--max-drop", "100%",
                   "--set", f"eval.checks={checks}", "--out", tmp_path / "g")
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert report["metrics"][0]["passed"] and report["check_regressions"] == {"says_42": list(range(16))}


def test_the_gate_writes_its_verdict_to_the_registry(registered, tmp_path):
    from dsft.lifecycle.registry import Registry
    from dsft.lifecycle.registry_views import describe_version

    store = registered["store"]
    dsft("registry", "promote", "support", "1", "--alias", "production", "--store", store)
    dsft("registry", "promote", "support", "2", "--alias", "candidate", "--force", "--store", store)
    result = dsft("gate", "registry:support@candidate", "--against", "registry:support@production", "--data",
                  registered["test"], "--store", store, "--out", tmp_path / "g")
    assert result.exit_code == 1, result.output
    candidate = describe_version(Registry(store), "support@2")
    # --against replaces the run config's gate.against; its gate.metrics (f1) stay.
    assert candidate["gate"]["verdict"] == "fail" and candidate["gate"]["failed"] == ["f1"]
    assert {e["metrics"]["exact_match"] for e in candidate["evaluations"].values()} == {0.0}
    from mlflow.tracking import MlflowClient

    report = {a.path for a in MlflowClient(store).list_artifacts(candidate["mlflow_run"], "gate")}
    assert report == {"gate/gate.json", "gate/gate.md"}


@pytest.mark.parametrize("args, message", [
    (("--metrics", "accuracy"), "gate.metrics (--metrics): accuracy unknown"),
    (("--max-drop", "five"), "--max-drop 'five': a percent"),
])
def test_bad_gate_input_is_an_error_with_exit_code_2(runs, args, message):
    assert message in error_of(_gate(runs, runs["right"], runs["wrong"], *args))


def test_the_run_config_s_gate_section_is_the_default(runs, tmp_path):
    result = dsft("gate", runs["wrong"], "--out", tmp_path / "g")
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert report["baseline"] == str(runs["right"]) and [m["name"] for m in report["metrics"]] == ["f1"]


def test_a_gate_without_a_baseline_says_how_to_name_one(runs):
    assert "--against" in error_of(dsft("gate", runs["right"], "--data", runs["test"]))
