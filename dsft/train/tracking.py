"""Experiment tracking on MLflow (config tracking.mlflow), through MlflowClient: no global MLflow state, no
active-run stack, nothing set in the environment.

One MLflow run per training stage, created when the stage builds its trainer: its params are the resolved config
(config.yaml, flattened to dotted keys), its dataset inputs the data fingerprints (sha256 over the canonical
records, as summary.json has them), its tags the run directory, stage, task and method. Every record metrics.jsonl
gets is logged at the same step with the same numbers as it is written (MetricsCallback forwards it), so MLflow,
metrics.jsonl and TensorBoard agree. At the end the run directory's small files (config, summary, metrics, expert
load, plots; never weights or tokenizers) are uploaded and the run is marked finished; a stage that fails or is
interrupted ends its run as FAILED or KILLED. `--resume` continues the same MLflow run (its id is kept in
tracking.json); the steps after the checkpoint are logged again, as metrics.jsonl writes them again.

Only rank 0 logs. The embedded default store is SQLite (mlflow.db beside the run directory, artifacts in
mlartifacts/), so no server is needed; tracking_uri points to a team's server instead.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import yaml

from dsft.config import RunConfig, dump_config
from dsft.config.tracking import TRACKING_FILE, MlflowConfig
from dsft.errors import DsftError, TrainingInterrupted
from dsft.train.distributed import is_main

ARTIFACT_SUFFIXES = (".yaml", ".json", ".jsonl", ".png", ".md")
MAX_ARTIFACT_BYTES = 10 * 2**20
MAX_PARAM_CHARS = 6000
"""MLflow's limit on a param value (longer ones are cut, with a marker)."""


class MlflowTracker:
    """The MLflow run of one stage: metrics as they are written, then the artifacts and its end status."""

    def __init__(self, client, run_id: str, uri: str, settings: MlflowConfig):
        self.client, self.run_id, self.uri, self.settings = client, run_id, uri, settings

    def log_record(self, record: dict) -> None:
        """One metrics.jsonl record: each finite or non-finite number under its own key, at record["step"]."""
        from mlflow.entities import Metric

        step, stamp_ms = int(record.get("step", 0)), int(record.get("time", time.time()) * 1000)
        metrics = [Metric(key, float(value), stamp_ms, step) for key, value in record.items()
                   if key not in ("step", "time") and isinstance(value, int | float) and not isinstance(value, bool)]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def finish(self, run_dir: Path, status: str = "FINISHED") -> None:
        """Upload the run directory's small files (unless log_artifacts is off) and end the run with status."""
        if self.settings.log_artifacts and status == "FINISHED":
            for path in sorted(Path(run_dir).iterdir()):
                if _is_small_artifact(path):
                    self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status=status)


def _is_small_artifact(path: Path) -> bool:
    return (path.is_file() and path.suffix in ARTIFACT_SUFFIXES and not path.name.startswith("tokenizer")
            and path.stat().st_size <= MAX_ARTIFACT_BYTES)


def start_tracking(config: RunConfig, run_dir: Path, fingerprints: dict[str, str], console) -> MlflowTracker | None:
    """The stage's MLflow run (a resumed run's own, from tracking.json), with its params, tags and dataset
    inputs logged; None when tracking is off or on ranks other than 0. Raises DsftError naming
    tracking.mlflow.tracking_uri when the store cannot be reached."""
    settings = config.tracking.mlflow
    if not settings.enabled or not is_main():
        return None
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise DsftError("tracking.mlflow.enabled needs MLflow: pip install 'dsft[tracking]'") from None
    uri = settings.store_uri(run_dir)
    client = MlflowClient(tracking_uri=uri)
    try:
        run_id = _resumed_run(run_dir, uri, client) or new_run(client, config, run_dir, uri, fingerprints)
    except (MlflowException, OSError) as exc:  # a refused request, or a store it cannot reach (requests: OSError)
        raise DsftError(f"tracking.mlflow.tracking_uri: cannot log to {uri}: {str(exc).splitlines()[0]}") from None
    (Path(run_dir) / TRACKING_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}) + "\n",
                                               encoding="utf-8")
    console.print(f"tracking: MLflow run {run_id} in experiment {settings.experiment!r} at {uri}", markup=False)
    return MlflowTracker(client, run_id, uri, settings)


def _resumed_run(run_dir: Path, uri: str, client) -> str | None:
    record = Path(run_dir) / TRACKING_FILE
    if not record.is_file():
        return None
    saved = json.loads(record.read_text(encoding="utf-8"))
    if saved.get("tracking_uri") != uri:
        return None  # tracked elsewhere before: a new run in the store now configured
    client.update_run(saved["run_id"], status="RUNNING")
    return saved["run_id"]


def new_run(client, config: RunConfig, run_dir: Path, uri: str, fingerprints: dict[str, str],
            experiment: str | None = None, extra_tags: dict[str, str] | None = None) -> str:
    """A new MLflow run for run_dir in the store at uri (in experiment, default the config's), with the resolved
    config as params, the fingerprints as dataset inputs and dsft's tags; returns its id."""
    from mlflow.entities import Param

    settings = config.tracking.mlflow
    experiment_id = _experiment_id(client, experiment or settings.experiment, uri)
    tags = {"dsft.run_dir": str(Path(run_dir).resolve()), "dsft.stage": config.stage, "dsft.task": config.task,
            "dsft.method": config.method.type, **(extra_tags or {})}
    run = client.create_run(experiment_id, run_name=settings.run_name or Path(run_dir).name, tags=tags)
    params = [Param(key, value) for key, value in flat_params(config).items()]
    for start in range(0, len(params), 100):  # MLflow's batch limit for params
        client.log_batch(run.info.run_id, params=params[start:start + 100])
    _log_datasets(client, run.info.run_id, config, fingerprints)
    return run.info.run_id


def _experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A SQLite store keeps its artifacts beside it, not in ./mlruns of whatever directory dsft runs in.
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def mirror_finished_run(client, uri: str, run_dir: Path, experiment: str) -> str:
    """An MLflow run in the store at uri recording a finished run directory after the fact (dsft registry register
    of a run trained without tracking, or tracked in another store): its config as params, summary.json's data
    fingerprints as dataset inputs, every metrics.jsonl record at its step, its small files as artifacts."""
    from dsft.config import load_config

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    run_id = new_run(client, config, run_dir, uri, summary.get("data_fingerprints", {}), experiment,
                     {"dsft.recorded_after_training": "true"})
    tracker = MlflowTracker(client, run_id, uri, config.tracking.mlflow.model_copy(update={"log_artifacts": True}))
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        for line in metrics_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                tracker.log_record(json.loads(line))
    tracker.finish(run_dir)
    return run_id


def flat_params(config: RunConfig) -> dict[str, str]:
    """The resolved config as config.yaml writes it (secrets masked there), flattened to dotted keys; lists and
    empty mappings as JSON, long values cut to MLflow's limit."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
            return
        text = json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else str(value)
        marker = "...(cut)"
        flat[prefix] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - len(marker)] + marker

    walk("", yaml.safe_load(dump_config(config)))
    return flat


def _log_datasets(client, run_id: str, config: RunConfig, fingerprints: dict[str, str]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    validation = set(config.data.validation_files)
    inputs = []
    for path, digest in fingerprints.items():
        context = "validation" if path in validation else "training"
        dataset = Dataset(name=Path(path).name, digest=digest[:36], source_type="local",
                          source=json.dumps({"uri": str(Path(path).resolve()), "sha256": digest}))
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


@contextlib.contextmanager
def ended_on_error(tracker: MlflowTracker | None):
    """Around a stage's training: an exception ends the MLflow run (KILLED for an interruption, FAILED otherwise)
    before it propagates."""
    try:
        yield
    except BaseException as exc:
        if tracker is not None:
            status = "KILLED" if isinstance(exc, TrainingInterrupted | KeyboardInterrupt) else "FAILED"
            with contextlib.suppress(Exception):  # the training error is the one to report
                tracker.finish(Path("."), status)
        raise
