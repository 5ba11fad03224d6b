"""Typed config of `dsft serve`: one optional YAML file with a `serve` section, `--set serve.key=value` overrides.

Every field has a docstring with its unit; unknown keys are errors naming the key path. API keys must be written as
`${NAME}` environment references (never literally, so a config file or a shell history never holds one).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, model_validator

from dsft.config.base import Section
from dsft.config.eval import CheckConfig
from dsft.config.loader import (
    apply_override,
    describe,
    expand_env_references,
    invalid,
    parse_yaml,
    read_text,
    where,
)

SERVED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
"""What a served model name looks like: it goes into URLs, headers and metric labels."""


class BatchingConfig(Section):
    engine: Literal["static", "continuous"] = "static"
    """static: dsft's batches of left-padded prompts, sized by a PID loop on the step latency (adapters, sampling,
    every architecture); continuous: transformers' ContinuousBatchingManager (one model, no adapters, no MLA)."""
    min_batch: int = Field(1, ge=1)
    """Fewest requests the controller may limit a batch to (static engine)."""
    max_batch: int = Field(32, ge=1, le=1024)
    """Most requests in one batch (static engine; continuous: most requests per forward)."""
    target_latency_ms: float = Field(50.0, gt=0)
    """Target time of one decoding step of a batch, ms: what a streaming client waits between tokens. Above it the
    batch limit shrinks, below it (with a full batch) it grows."""
    kp: float = Field(0.1, ge=0)
    """Proportional gain: batch-limit change per step, as a fraction of max_batch per unit of relative error."""
    ki: float = Field(0.3, ge=0)
    """Integral gain (same unit as kp): what makes the limit settle where the step latency equals the target."""
    kd: float = Field(0.0, ge=0)
    """Derivative gain (same unit as kp); 0 because step latency is noisy."""
    max_wait_ms: float = Field(5.0, ge=0)
    """How long the first request of an idle server waits for others to share its batch, ms."""
    max_queue: int = Field(1024, ge=1)
    """Most requests waiting for a batch; more are refused with 503 (server_overloaded)."""

    @model_validator(mode="after")
    def _batch_bounds(self):
        if self.min_batch > self.max_batch:
            raise ValueError(f"min_batch ({self.min_batch}) must be at most max_batch ({self.max_batch})")
        return self


class CacheConfig(Section):
    max_entries: int = Field(1024, ge=0)
    """Replies kept for repeated greedy (temperature 0) requests, least recently used dropped first; 0 turns the
    cache off."""


class LimitsConfig(Section):
    max_body_bytes: int = Field(1_048_576, ge=1024)
    """Largest request body, bytes; larger is refused with 413 before it is read whole."""
    max_prompt_tokens: int = Field(4096, ge=1)
    """Longest rendered prompt, tokens; longer is refused with 400 (context_length_exceeded)."""
    max_tokens: int = Field(1024, ge=1)
    """Largest max_tokens a request may ask for, tokens; larger is refused with 400."""
    default_max_tokens: int = Field(256, ge=1)
    """max_tokens of a request that gives none (lowered to max_tokens if above it), tokens."""
    request_timeout_s: float = Field(120.0, gt=0)
    """A request not finished after this long (queue wait included) is cancelled and answered 504, seconds."""


class CanaryConfig(Section):
    alias: str
    """The model name clients ask for; each request goes to primary or candidate."""
    primary: str
    """Served model name that gets the rest of the traffic."""
    candidate: str
    """Served model name under test."""
    percent: float | None = Field(None, ge=0, le=100)
    """A fixed share of the alias's requests sent to candidate, percent (or give steps)."""
    steps: list[float] = []
    """A progressive canary: the candidate's share rises through these percents, e.g. [1, 5, 25, 50, 100], while
    its live metrics hold (or give percent)."""
    step_after_requests: int = Field(50, ge=1)
    """Requests the candidate answers at a step before its share moves to the next step."""
    rollback_on: list[Literal["error_rate", "p95_latency", "feedback", "checks"]] = ["error_rate", "p95_latency"]
    """Live metrics watched: server errors (5xx) per request, 95th-percentile latency, the mean user feedback score
    (POST /v1/feedback), the pass rate of each online check. Empty: never roll back."""
    max_worse_percent: float = Field(5.0, ge=0)
    """Roll back when the candidate is worse than the primary by more than this: percentage points for rates and
    feedback scores (0..1 as percent), percent of the primary's value for latency."""
    min_requests: int = Field(20, ge=1)
    """Answers (or feedback scores) each side needs before a watched metric can decide a rollback."""
    checks: list[CheckConfig] = []
    """Online checks on every reply of both: a regex that must match, or a Python "module:function" called as
    f(answer, None, prompt) -> bool | float (as eval.checks)."""
    seed: int | None = None
    """Seed of the router's random draws (tests); none: unseeded."""

    @model_validator(mode="after")
    def _share(self):
        if (self.percent is None) == (not self.steps):
            raise ValueError("give exactly one of percent (a fixed share) or steps (a progressive canary)")
        if self.steps and (any(not 0 < s <= 100 for s in self.steps) or self.steps != sorted(set(self.steps))):
            raise ValueError(f"steps {self.steps}: rising percents above 0 and at most 100")
        if "checks" in self.rollback_on and not self.checks:
            raise ValueError("rollback_on has checks: define them under checks")
        return self

    @property
    def start_percent(self) -> float:
        return self.percent if self.percent is not None else self.steps[0]


class ShadowConfig(Section):
    primary: str
    """Served model name whose answers clients get."""
    candidate: str
    """Served model name that answers a share of the primary's requests in the background; its answers are only
    compared, never returned."""
    percent: float = Field(ge=0, le=100)
    """Share of the primary's answered requests the candidate answers too, percent."""
    max_in_flight: int = Field(4, ge=1)
    """Shadow answers waiting or generating at once; a request beyond it is not shadowed (counted as skipped), so
    a slow candidate cannot pile up work."""
    report_file: str = "shadow.jsonl"
    """One JSON line per compared pair (agreement, lengths, latencies; texts only with serve.log_prompts), and a
    summary beside it (.summary.json) when the server stops."""
    seed: int | None = None
    """Seed of the draws (tests); none: unseeded."""


class FeedbackConfig(Section):
    log_file: str | None = None
    """Append each feedback (response id, served model, score, comment) to this JSON-lines file; none: counted
    only (in /metrics and the registry)."""
    max_comment_chars: int = Field(2000, ge=0)
    """Longest comment accepted; longer is a 400."""
    remembered_responses: int = Field(100_000, ge=1)
    """Most recent response ids feedback can name; older ones are forgotten (a 404)."""


class ServeConfig(Section):
    host: str = "127.0.0.1"
    """Address to bind; the loopback default keeps the server off the network until you choose otherwise."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port; 0 picks a free one (printed at startup)."""
    model_name: str | None = None
    """Name the served RUN_OR_DIR answers to in the model field; default: the directory's name."""
    adapters: dict[str, str] = Field(default_factory=dict)
    """More LoRA runs on the same base, served by name: {name: run directory}. Loaded once at startup."""
    canary: CanaryConfig | None = None
    """Split one alias's traffic between two served models: a fixed percent, or steps with automatic rollback."""
    shadow: ShadowConfig | None = None
    """Let a candidate answer a share of the primary's requests in the background and compare the answers."""
    feedback: FeedbackConfig = FeedbackConfig()
    """User feedback on replies (POST /v1/feedback)."""
    registry_uri: str | None = None
    """Registry store of registry:NAME@ALIAS targets and adapters, where the deployment log is written; default as
    dsft registry's ($MLFLOW_REGISTRY_URI, $MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    api_keys: list[SecretStr] = Field(default_factory=list)
    """Keys a client must send (Authorization: Bearer KEY); each a ${NAME} environment reference. Empty: no keys."""
    log_prompts: bool = False
    """Write prompts and replies to the server log (off: only sizes, timings and model names are logged)."""
    batching: BatchingConfig = BatchingConfig()
    """How requests are batched for the model."""
    cache: CacheConfig = CacheConfig()
    """Response cache for greedy requests."""
    limits: LimitsConfig = LimitsConfig()
    """Caps on what one request may ask for."""

    @model_validator(mode="after")
    def _names(self):
        for name in [*self.adapters, *([self.model_name] if self.model_name else [])]:
            if not SERVED_NAME.match(name):
                raise ValueError(f"served name {name!r}: use letters, digits and . _ : - (at most 128)")
        if self.canary is not None and not SERVED_NAME.match(self.canary.alias):
            raise ValueError(f"canary.alias {self.canary.alias!r}: use letters, digits and . _ : - (at most 128)")
        return self


class ServeFile(Section):
    serve: ServeConfig = ServeConfig()
    """Settings of `dsft serve`."""


def load_serve_config(path: str | Path | None, overrides=()) -> ServeConfig:
    """The serve settings: defaults, then the YAML file (if any), then `--set` overrides; ${NAME} references are
    replaced from the environment. Raises DsftError naming the key path (and YAML line) of each problem, and for an
    API key that is written literally instead of as a ${NAME} reference."""
    text = read_text(Path(path)) if path is not None else None
    source = str(path) if path is not None else "--set"
    raw = parse_yaml(text, Path(path)) if text is not None else {}
    for override in overrides:
        apply_override(raw, override)
    expanded, references, problems = expand_env_references(raw)
    if problems:
        raise invalid(source, [f"{where(loc, text)}: {problem}" for loc, problem in problems])
    try:
        config = ServeFile.model_validate(expanded).serve
    except ValidationError as exc:
        secrets = tuple(("serve", "api_keys", str(i)) for i in range(64))
        raise invalid(source, [describe(err, text, ServeFile, secrets) for err in exc.errors()]) from None
    literal = [i for i in range(len(config.api_keys)) if ("serve", "api_keys", i) not in references]
    if literal:
        raise invalid(source, [f"{where(('serve', 'api_keys', i), text)}: write the key as a ${{NAME}} environment "
                               "reference, never literally" for i in literal])
    empty = [i for i, key in enumerate(config.api_keys) if not key.get_secret_value()]
    if empty:
        raise invalid(source, [f"serve.api_keys.{i}: the environment variable is empty" for i in empty])
    return config
