"""The model registry of `dsft registry`, `dsft gate` and `dsft serve`, on MLflow's model registry (MlflowClient:
registered models, versions, aliases, tags; no global MLflow state).

A version is one finished run directory, and holds the five things a release needs, as tags MLflow's own UI shows:
  1. the training data fingerprints (dsft.data_fingerprints, and the linked MLflow run's dataset inputs);
  2. the hyper-parameters: the linked MLflow run's params (the resolved config, flattened);
  3. evaluation results: dsft.eval.<data sha256[:16]> per test set (the run's own dsft eval, and every gate's);
  4. the deployment log: dsft.deployment.<id>, one per `dsft serve` that served it (host, port, start, end);
  5. the retirement: dsft.retired (reason and time); a retired version is promoted only with force.
Every change is also an event (dsft.event.<time>) that `history` lists. The weights stay in the run directory
(dsft.run_dir): the registry records where they are and their sha256, it never copies gigabytes.

The store: an explicit URI, else $MLFLOW_REGISTRY_URI or $MLFLOW_TRACKING_URI (MLflow's own variables), else the
SQLite file mlflow.db in the current directory. A version links an MLflow run in the same store: the run's own when
it was tracked there (tracking.json), else one recorded from the run directory at registration.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from dsft.errors import DsftError

REF_PREFIX = "registry:"
"""`dsft serve registry:NAME@production` (or @candidate, or @3 for a version number)."""
ALIASES = ("production", "candidate")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
EXPERIMENT = "dsft-registry"
"""Experiment of the MLflow runs recorded at registration for run directories tracked elsewhere or not at all."""
TAG_RUN_DIR, TAG_RETIRED, TAG_WEIGHTS = "dsft.run_dir", "dsft.retired", "dsft.weights_sha256"
TAG_FINGERPRINTS, EVAL_PREFIX = "dsft.data_fingerprints", "dsft.eval."
EVENT_PREFIX, DEPLOYMENT_PREFIX = "dsft.event.", "dsft.deployment."


def store_uri(explicit: str | None = None) -> str:
    """The registry store in force (see the module docstring)."""
    for value in (explicit, os.environ.get("MLFLOW_REGISTRY_URI"), os.environ.get("MLFLOW_TRACKING_URI")):
        if value:
            return value
    return f"sqlite:///{(Path.cwd() / 'mlflow.db').as_posix()}"


@dataclass(frozen=True)
class Ref:
    """NAME, NAME@alias or NAME@version, as a user writes it."""

    name: str
    selector: str | None = None

    @classmethod
    def parse(cls, text: str) -> Ref:
        """Raises DsftError for a reference that is not NAME[@production|@candidate|@N]."""
        name, _, selector = text.removeprefix(REF_PREFIX).partition("@")
        if not MODEL_NAME.match(name) or (selector and selector not in ALIASES and not selector.isdigit()):
            raise DsftError(f"{text!r}: a registry reference is NAME, NAME@VERSION or NAME@ALIAS ({', '.join(ALIASES)})"
                            "; names use letters, digits and . _ -")
        return cls(name, selector or None)

    def __str__(self) -> str:
        return f"{self.name}@{self.selector}" if self.selector else self.name


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _stamp_key(prefix: str) -> str:
    """A tag key that sorts by time and does not collide between processes."""
    return f"{prefix}{time.time_ns():020d}-{os.getpid()}"


class Registry:
    """One registry store; every MLflow error becomes a DsftError naming the store."""

    def __init__(self, uri: str | None = None):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise DsftError("the registry needs MLflow: pip install 'dsft[tracking]'") from None
        self.uri = store_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    @contextlib.contextmanager
    def talking(self):
        """Around calls to the store: an MLflow or connection error becomes a DsftError naming the store."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except (MlflowException, OSError) as exc:
            raise DsftError(f"registry {self.uri}: {str(exc).splitlines()[0]}") from None

    # -- reading ---------------------------------------------------------------------------------------------------
    def models(self) -> list:
        with self.talking():
            return list(self.client.search_registered_models(max_results=1000))

    def model(self, name: str):
        """The registered model; raises DsftError naming the models the store has."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException:
            known = ", ".join(m.name for m in self.models()) or "none yet"
            raise DsftError(f"registry {self.uri}: no model named {name!r}; registered: {known}") from None

    def versions(self, name: str) -> list:
        """Every version of name, oldest first."""
        self.model(name)
        with self.talking():
            found = self.client.search_model_versions(f"name='{name}'", max_results=10000)
        return sorted(found, key=lambda v: int(v.version))

    def version(self, ref: Ref | str):
        """The version a reference names (no selector: the newest); raises DsftError for an unknown version or an
        alias that points nowhere, naming what exists."""
        ref = Ref.parse(ref) if isinstance(ref, str) else ref
        versions = self.versions(ref.name)
        if ref.selector is None:
            if not versions:
                raise DsftError(f"registry: {ref.name} has no versions")
            return versions[-1]
        if ref.selector.isdigit():
            match = [v for v in versions if str(v.version) == ref.selector]
            if not match:
                raise DsftError(f"registry: {ref.name} has no version {ref.selector}; versions: "
                                f"{', '.join(str(v.version) for v in versions) or 'none'}")
            return match[0]
        aliases = self.model(ref.name).aliases
        if ref.selector not in aliases:
            held = ", ".join(f"{a} -> {v}" for a, v in aliases.items()) or "none set"
            raise DsftError(f"registry: {ref.name} has no version at @{ref.selector} (aliases: {held}); "
                            f"set it with dsft registry promote {ref.name} VERSION --alias {ref.selector}")
        return next(v for v in versions if str(v.version) == str(aliases[ref.selector]))

    def run_dir(self, ref: Ref | str) -> Path:
        """The run directory a reference's version was registered from; raises DsftError when it is gone."""
        version = self.version(ref)
        path = Path(version.tags.get(TAG_RUN_DIR, ""))
        if not (path / "config.yaml").is_file():
            raise DsftError(f"registry: {version.name} version {version.version} was registered from {path}, "
                            "which no longer holds a run (config.yaml)")
        return path

    def events(self, name: str) -> list[dict]:
        """Every event and deployment of every version of name, oldest first."""
        rows = []
        for version in self.versions(name):
            for key, value in version.tags.items():
                if key.startswith((EVENT_PREFIX, DEPLOYMENT_PREFIX)):
                    entry = json.loads(value)
                    kind = "deployment" if key.startswith(DEPLOYMENT_PREFIX) else entry.get("event")
                    rows.append({"version": str(version.version), "kind": kind, **entry})
        return sorted(rows, key=lambda row: row.get("time") or row.get("start") or "")

    def deployments(self, version) -> list[dict]:
        return sorted((json.loads(v) | {"id": k.removeprefix(DEPLOYMENT_PREFIX)} for k, v in version.tags.items()
                       if k.startswith(DEPLOYMENT_PREFIX)), key=lambda entry: entry["start"])

    # -- writing ---------------------------------------------------------------------------------------------------
    def set_tag(self, version, key: str, value) -> None:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
        with self.talking():
            self.client.set_model_version_tag(version.name, str(version.version), key, text)

    def add_event(self, version, event: str, **details) -> None:
        """An entry of `dsft registry history` on version (promoted, retired, gate, rollback, ...)."""
        self.set_tag(version, _stamp_key(EVENT_PREFIX), {"event": event, "time": now_iso(), **details})

    def create_version(self, name: str, source: str, run_id: str, tags: dict[str, str], description: str):
        if not MODEL_NAME.match(name):
            raise DsftError(f"--name {name!r}: use letters, digits and . _ - (at most 128)")
        from mlflow.exceptions import MlflowException

        with self.talking():
            try:
                self.client.get_registered_model(name)
            except MlflowException:
                self.client.create_registered_model(name, description="fine-tuned with dsft")
            return self.client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)

    def promote(self, ref: Ref | str, alias: str, force: bool = False) -> str | None:
        """Point alias at the version; returns the version it pointed at before (None). Raises DsftError for an
        alias outside ALIASES, or a retired version without force."""
        if alias not in ALIASES:
            raise DsftError(f"--alias {alias!r}: one of {', '.join(ALIASES)}")
        version = self.version(ref)
        retired = version.tags.get(TAG_RETIRED)
        if retired and not force:
            raise DsftError(f"registry: {version.name} version {version.version} is retired "
                            f"({json.loads(retired)['reason']}); promote it anyway with --force")
        previous = self.model(version.name).aliases.get(alias)
        with self.talking():
            self.client.set_registered_model_alias(version.name, alias, version.version)
        self.add_event(version, "promoted", alias=alias, previous=None if previous is None else str(previous),
                       forced=bool(retired))
        return None if previous is None else str(previous)

    def retire(self, ref: Ref | str, reason: str) -> list[str]:
        """Mark the version retired with reason and take away its aliases (returned). Raises DsftError for an empty
        reason or a version retired already."""
        if not reason.strip():
            raise DsftError("--reason: say why the version is retired (kept with it for good)")
        version = self.version(ref)
        if TAG_RETIRED in version.tags:
            raise DsftError(f"registry: {version.name} version {version.version} was retired already: "
                            f"{json.loads(version.tags[TAG_RETIRED])['reason']}")
        aliases = [a for a, v in self.model(version.name).aliases.items() if str(v) == str(version.version)]
        with self.talking():
            for alias in aliases:
                self.client.delete_registered_model_alias(version.name, alias)
        self.set_tag(version, TAG_RETIRED, {"reason": reason, "time": now_iso()})
        self.add_event(version, "retired", reason=reason, aliases_removed=aliases)
        return aliases

    def open_deployment(self, version, served_as: str, host: str, port: int) -> str:
        """Append a deployment entry (end unset) and return its id. An entry of the same model on the same host and
        port still open is a server that stopped without closing it: it is closed first, as ended when this one
        started, so the log never shows two servers on one port at once."""
        start = now_iso()
        for other in self.versions(version.name):
            for entry in self.deployments(other):
                if entry["end"] is None and (entry["host"], entry["port"]) == (host, port):
                    self._close(other, entry, start, "not closed by its server (it stopped abruptly); closed at "
                                                     "the next start on this host and port")
        key = _stamp_key(DEPLOYMENT_PREFIX)
        entry = {"start": start, "end": None, "host": host, "port": port, "pid": os.getpid(), "served_as": served_as,
                 "hostname": socket.gethostname()}
        self.set_tag(version, key, entry)
        return key.removeprefix(DEPLOYMENT_PREFIX)

    def close_deployment(self, version, deployment_id: str, how: str = "stopped", **details) -> None:
        with self.talking():
            fresh = self.client.get_model_version(version.name, version.version)
        entry = json.loads(fresh.tags[DEPLOYMENT_PREFIX + deployment_id]) | {"id": deployment_id}
        self._close(fresh, entry, now_iso(), how, **details)

    def _close(self, version, entry: dict, end: str, how: str, **details) -> None:
        key = DEPLOYMENT_PREFIX + entry.pop("id")
        self.set_tag(version, key, entry | {"end": end, "ended": how, **details})
