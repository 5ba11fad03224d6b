"""dsft eval of a run that was tracked on MLflow: its scores join the run's MLflow run (metrics eval/DATA/NAME at
step 0, the eval directory as artifacts under eval/OUT), so the run's page holds its evaluation too. A store that
cannot be reached leaves the eval as written and says so; it never fails the eval."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dsft.config.tracking import TRACKING_FILE


def log_eval_to_run(target_path: str, results: dict, out: Path, console) -> str | None:
    """Log the target's metrics and the eval directory to target_path's MLflow run; returns its run id, or None
    when the target was not tracked (or MLflow is not installed)."""
    record = Path(target_path) / TRACKING_FILE
    if not record.is_file():
        return None
    try:
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        return None
    saved = json.loads(record.read_text(encoding="utf-8"))
    data_name = Path(results["data"]["path"]).stem
    stamp_ms = int(time.time() * 1000)
    section = results["models"]["target"]
    scores = section.get("metrics", section.get("headline", {}))  # generation evals, classifier evals
    metrics = [Metric(f"eval/{data_name}/{name}", float(value), stamp_ms, 0) for name, value in scores.items()
               if isinstance(value, int | float) and not isinstance(value, bool)]
    try:
        client = MlflowClient(tracking_uri=saved["tracking_uri"])
        if metrics:
            client.log_batch(saved["run_id"], metrics=metrics)
        client.log_artifacts(saved["run_id"], str(out), artifact_path=f"eval/{out.name}")
    except (MlflowException, OSError) as exc:
        console.print(f"tracking: could not add the eval to MLflow run {saved['run_id']} at {saved['tracking_uri']}: "
                      f"{str(exc).splitlines()[0]}", markup=False)
        return None
    console.print(f"tracking: eval logged to MLflow run {saved['run_id']}", markup=False)
    return saved["run_id"]
