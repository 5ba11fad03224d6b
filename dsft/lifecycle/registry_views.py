"""The verbs of `dsft registry`: register a run directory, and list, show, promote, retire and trace versions."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dsft.errors import DsftError
from dsft.lifecycle.registry import (
    ALIASES,
    EVAL_PREFIX,
    EXPERIMENT,
    TAG_FINGERPRINTS,
    TAG_RETIRED,
    TAG_RUN_DIR,
    TAG_WEIGHTS,
    Ref,
    Registry,
)

SHOWN_PARAMS = ("model.name_or_path", "model.preset", "method.type", "method.lora.r", "method.lora.alpha",
                "train.learning_rate", "train.epochs", "train.max_steps", "train.batch_size",
                "train.gradient_accumulation_steps", "train.seed", "data.chat_template")
"""Hyper-parameters `show` prints; the linked MLflow run holds every key of the resolved config."""


def eval_tag(results: dict, role: str = "target") -> tuple[str, dict]:
    """(tag key, value) recording one model's scores in a dsft eval results.json: keyed by the test data's sha256,
    so a later gate on the same data finds them."""
    section = results["models"][role]
    value = {"data": results["data"]["path"], "data_sha256": results["data"]["sha256"],
             "examples": results["data"]["examples"], "created": results["created"],
             "metrics": section["metrics"], "ci": section.get("ci", {})}
    return EVAL_PREFIX + results["data"]["sha256"][:16], value


def register_run(run: Path, name: str, store: str | None, console: Console | None = None):
    """Register a finished run directory as the next version of name (the model created when new); returns it.
    Raises DsftError for a directory that is not a finished run, or a run registered under name already."""
    from dsft.config import load_config
    from dsft.eval.targets import weights_sha256
    from dsft.train.loop import data_fingerprints

    console = console or Console(soft_wrap=True)
    run_dir = Path(run).resolve()
    summary_file, config_file = run_dir / "summary.json", run_dir / "config.yaml"
    if not config_file.is_file():
        hint = " (a multi-stage run: register its last stage, under stages/)" if (run_dir / "stages").is_dir() else ""
        raise DsftError(f"{run}: not a run directory (no config.yaml){hint}")
    if not summary_file.is_file():
        raise DsftError(f"{run}: the run has not finished (no summary.json); register it when it has")
    registry = Registry(store)
    config = load_config(config_file)
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    weights = weights_sha256(run_dir) or weights_sha256(run_dir / "merged") or "none"
    _refuse_twice(registry, name, run_dir, weights)
    fingerprints = summary.get("data_fingerprints") or data_fingerprints(config.data)
    run_id = _linked_run(registry, run_dir)
    with registry.talking():
        source = registry.client.get_run(run_id).info.artifact_uri
    tags = {TAG_RUN_DIR: str(run_dir), TAG_WEIGHTS: weights, TAG_FINGERPRINTS: json.dumps(fingerprints),
            "dsft.stage": config.stage, "dsft.task": config.task, "dsft.method": config.method.type,
            "dsft.base_model": config.model.name_or_path or f"preset:{config.model.preset}"}
    own_eval = run_dir / "eval" / "results.json"
    if own_eval.is_file():
        key, value = eval_tag(json.loads(own_eval.read_text(encoding="utf-8")))
        tags[key] = json.dumps(value, sort_keys=True)
    version = registry.create_version(name, source, run_id, tags, f"dsft {config.stage} run {run_dir}")
    registry.add_event(version, "registered", run_dir=str(run_dir), mlflow_run=run_id)
    console.print(f"registered {name} version {version.version} from {run_dir} in {registry.uri} "
                  f"(MLflow run {run_id})", markup=False)
    return version


def _refuse_twice(registry: Registry, name: str, run_dir: Path, weights: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        registry.client.get_registered_model(name)
    except MlflowException:
        return
    for version in registry.versions(name):
        if version.tags.get(TAG_RUN_DIR) == str(run_dir) and version.tags.get(TAG_WEIGHTS) == weights:
            raise DsftError(f"{run_dir} is registered already as {name} version {version.version} (same weights)")


def _linked_run(registry: Registry, run_dir: Path) -> str:
    """The MLflow run of run_dir in the registry's store: the one it was tracked as (tracking.json) when that is
    this store, else one recorded now from the run directory."""
    from dsft.train.tracking import TRACKING_FILE, mirror_finished_run

    record = run_dir / TRACKING_FILE
    if record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved.get("tracking_uri") == registry.uri:
            return saved["run_id"]
    with registry.talking():
        return mirror_finished_run(registry.client, registry.uri, run_dir, EXPERIMENT)


def list_registry(name: str | None, store: str | None, console: Console | None = None) -> None:
    """Without name: every registered model with its aliases; with it: every version of it."""
    console = console or Console(soft_wrap=True)
    registry = Registry(store)
    if name is None:
        table = Table("model", "versions", "aliases", title=f"registry {registry.uri}")
        for model in registry.models():
            aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(model.aliases.items()))
            table.add_row(model.name, str(len(registry.versions(model.name))), aliases or "-")
        console.print(table)
        return
    aliases = registry.model(name).aliases
    table = Table("version", "aliases", "registered", "run directory", "retired", title=f"{name} in {registry.uri}")
    for version in registry.versions(name):
        held = ", ".join(a for a, v in aliases.items() if str(v) == str(version.version))
        retired = json.loads(version.tags[TAG_RETIRED])["reason"] if TAG_RETIRED in version.tags else "-"
        table.add_row(str(version.version), held or "-", _when(version.creation_timestamp),
                      version.tags.get(TAG_RUN_DIR, "?"), retired)
    console.print(table)


def _when(stamp_ms: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(stamp_ms / 1000, datetime.UTC).isoformat(timespec="seconds")


def describe_version(registry: Registry, ref: Ref | str) -> dict:
    """The five things a version records (and its aliases and links), as `show` prints and tests read them."""
    version = registry.version(ref)
    with registry.talking():
        params = registry.client.get_run(version.run_id).data.params if version.run_id else {}
    aliases = [a for a, v in registry.model(version.name).aliases.items() if str(v) == str(version.version)]
    evals = {k.removeprefix(EVAL_PREFIX): json.loads(v) for k, v in version.tags.items() if k.startswith(EVAL_PREFIX)}
    retired = version.tags.get(TAG_RETIRED)
    gate = version.tags.get("dsft.gate")
    return {"name": version.name, "version": str(version.version), "aliases": aliases,
            "run_dir": version.tags.get(TAG_RUN_DIR), "weights_sha256": version.tags.get(TAG_WEIGHTS),
            "mlflow_run": version.run_id, "data_fingerprints": json.loads(version.tags.get(TAG_FINGERPRINTS, "{}")),
            "hyperparameters": params, "evaluations": evals, "deployments": registry.deployments(version),
            "retired": json.loads(retired) if retired else None, "gate": json.loads(gate) if gate else None,
            "feedback": _feedback(registry.deployments(version))}


def _feedback(deployments: list[dict]) -> dict | None:
    """The user feedback of every deployment of a version together (each server closes its entry with its own)."""
    tallies = [entry["feedback"] for entry in deployments if entry.get("feedback")]
    responses = sum(t["responses"] for t in tallies)
    if not responses:
        return None
    return {"responses": responses, "mean_score": sum(t["responses"] * t["mean_score"] for t in tallies) / responses}


def show_version(ref: str, store: str | None, as_json: bool = False, console: Console | None = None) -> dict:
    console = console or Console(soft_wrap=True)
    registry = Registry(store)
    info = describe_version(registry, Ref.parse(ref))
    if as_json:
        console.print_json(json.dumps(info))
        return info
    console.print(f"{info['name']} version {info['version']}  aliases: {', '.join(info['aliases']) or '-'}",
                  markup=False)
    console.print(f"run directory: {info['run_dir']}\nweights sha256: {info['weights_sha256']}\n"
                  f"MLflow run: {info['mlflow_run']} in {registry.uri}", markup=False)
    for path, digest in info["data_fingerprints"].items():
        console.print(f"data: {path}  sha256 {digest}", markup=False)
    shown = {key: info["hyperparameters"][key] for key in SHOWN_PARAMS if key in info["hyperparameters"]}
    console.print(f"hyper-parameters ({len(info['hyperparameters'])} in the MLflow run): "
                  + ", ".join(f"{k}={v}" for k, v in shown.items()), markup=False)
    for entry in info["evaluations"].values():
        numbers = ", ".join(f"{k}={v:.4g}" for k, v in entry["metrics"].items() if isinstance(v, int | float))
        console.print(f"eval on {entry['data']} ({entry['examples']} examples, {entry['created']}): {numbers}",
                      markup=False)
    if info["gate"]:
        console.print(f"gate: {info['gate']['verdict']} against {info['gate']['baseline']} ({info['gate']['time']})",
                      markup=False)
    for entry in info["deployments"]:
        console.print(f"deployed as {entry['served_as']} on {entry['hostname']} {entry['host']}:{entry['port']} "
                      f"from {entry['start']} until {entry['end'] or 'now'}", markup=False)
    if info["feedback"]:
        console.print(f"user feedback: {info['feedback']['responses']} replies, mean score "
                      f"{info['feedback']['mean_score']:.3f}", markup=False)
    if info["retired"]:
        console.print(f"retired {info['retired']['time']}: {info['retired']['reason']}", markup=False)
    return info


def promote_version(name: str, version: str, alias: str, force: bool, store: str | None,
                    console: Console | None = None) -> None:
    console = console or Console(soft_wrap=True)
    if alias not in ALIASES:
        raise DsftError(f"--alias {alias!r}: one of {', '.join(ALIASES)}")
    previous = Registry(store).promote(Ref(name, _version_number(version)), alias, force)
    moved = f" (was version {previous})" if previous else ""
    console.print(f"{name}@{alias} -> version {version}{moved}", markup=False)


def retire_version(name: str, version: str, reason: str, store: str | None, console: Console | None = None) -> None:
    console = console or Console(soft_wrap=True)
    removed = Registry(store).retire(Ref(name, _version_number(version)), reason)
    note = f"; aliases removed: {', '.join(removed)}" if removed else ""
    console.print(f"{name} version {version} retired: {reason}{note}", markup=False)


def _version_number(text: str) -> str:
    if not text.isdigit():
        raise DsftError(f"VERSION {text!r}: a version number (dsft registry list NAME shows them)")
    return text


def print_history(name: str, store: str | None, console: Console | None = None) -> list[dict]:
    """Every event of every version of name in time order: registered, promoted, gates, deployments, rollbacks,
    retirements."""
    console = console or Console(soft_wrap=True)
    events = Registry(store).events(name)
    table = Table("time", "version", "event", "details", title=f"history of {name}")
    for event in events:
        details = {k: v for k, v in event.items() if k not in ("time", "version", "kind", "event")}
        table.add_row(event.get("time") or event.get("start"), event["version"], event["kind"],
                      json.dumps(details, ensure_ascii=False))
    console.print(table)
    return events
