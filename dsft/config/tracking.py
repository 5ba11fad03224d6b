"""Config section tracking: experiment tracking of every training stage on MLflow (dsft/train/tracking.py)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from dsft.config.base import Section

TRACKING_FILE = "tracking.json"
"""Beside a tracked run: the MLflow tracking URI and run id, so --resume continues the run, dsft eval adds its
results to it and a user finds it."""
DEFAULT_STORE = "mlflow.db"
"""The embedded store's file name, beside the run directory (in its parent directory)."""


class MlflowConfig(Section):
    enabled: bool = False
    """Log each stage to MLflow: params (the resolved config, flattened), every metrics.jsonl record as it is
    written, the data fingerprints as dataset inputs, and the run directory's small files at the end."""
    tracking_uri: str | None = None
    """Where: a team's server (http://host:5000) or any MLflow store URI; none: an embedded SQLite store,
    mlflow.db beside output.dir (artifacts in mlartifacts/ there), no server needed."""
    experiment: str = Field("dsft", min_length=1)
    """MLflow experiment the runs go to (created when missing)."""
    run_name: str | None = None
    """MLflow run name; none: output.dir's name (a stage of a multi-stage run: the run's name and the stage's)."""
    log_artifacts: bool = True
    """Upload the run directory's small files at the end (config.yaml, summary.json, metrics.jsonl, expert load,
    plots); never weights."""

    def store_uri(self, output_dir: str | Path) -> str:
        """The tracking URI in force for a run written to output_dir."""
        if self.tracking_uri is not None:
            return self.tracking_uri
        return f"sqlite:///{(Path(output_dir).resolve().parent / DEFAULT_STORE).as_posix()}"


class TrackingConfig(Section):
    mlflow: MlflowConfig = MlflowConfig()
    """Experiment tracking on MLflow (off by default)."""
