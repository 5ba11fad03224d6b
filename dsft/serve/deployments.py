"""The deployment log of models served from the registry: an entry opens when the server starts (host, port,
served name, start), closes when it stops (end, requests answered, feedback), and a rollback is an event on the
candidate's version. A server that died without closing its entries gets them closed by the next start on the same
host and port (dsft/lifecycle/registry.py), so the log stays consistent across restarts. A registry that cannot be
reached never stops serving: the failure is logged and serving goes on."""

from __future__ import annotations

import logging

from dsft.errors import DsftError
from dsft.serve.models import ServedModels

log = logging.getLogger("dsft.serve")


class Deployments:
    def __init__(self, served: ServedModels, registry_uri: str | None, host: str, port: int):
        self.host, self.port = host, port
        self.entries = {entry.name: entry.registry for entry in served.by_name.values() if entry.registry}
        self.registry = None
        self._open: dict[str, tuple] = {}  # served name -> (version, deployment id)
        if self.entries:
            from dsft.lifecycle.registry import Registry

            self.registry = Registry(registry_uri)

    def start(self) -> None:
        for served, (name, number) in self.entries.items():
            try:
                version = self.registry.version(f"{name}@{number}")
                self._open[served] = (version, self.registry.open_deployment(version, served, self.host, self.port))
                log.info("registry: %s version %s deployed as %s on %s:%d", name, number, served, self.host,
                         self.port)
            except DsftError as exc:
                log.error("registry: could not log the deployment of %s: %s", served, exc)

    def stop(self, answered: dict[str, int], feedback: dict[str, dict]) -> None:
        for served, (version, deployment_id) in self._open.items():
            try:
                self.registry.close_deployment(version, deployment_id, "stopped", requests=answered.get(served, 0),
                                               feedback=feedback.get(served))
            except DsftError as exc:
                log.error("registry: could not close the deployment of %s: %s", served, exc)
        self._open.clear()

    def rolled_back(self, served: str, alias: str, reason: str) -> None:
        """Called off the event loop (the canary's rollback thread)."""
        if served not in self.entries:
            return
        try:
            name, number = self.entries[served]
            version = self.registry.version(f"{name}@{number}")
            self.registry.add_event(version, "rollback", alias=alias, reason=reason, host=self.host, port=self.port)
        except DsftError as exc:
            log.error("registry: could not record the rollback of %s: %s", served, exc)
