"""User feedback on replies: POST /v1/feedback {response_id, score (0..1) or thumbs (up/down), comment?}.

The server remembers which served model gave each recent response id (a bounded table, oldest forgotten first), so
feedback is counted for the version that answered, also behind a canary alias. A second feedback on one response
replaces the first. The tallies per served model are in /metrics, feed the canary's feedback watch, and go to the
registry's deployment log. Comments are never logged; with serve.feedback.log_file set, each feedback is appended
there.
"""

from __future__ import annotations

import datetime
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dsft.config.serve import FeedbackConfig
from dsft.serve.openai_schema import ApiError, parse_request


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    response_id: str = Field(min_length=1, max_length=128)
    """The id of a reply this server gave (its "id" field)."""
    score: float | None = Field(None, ge=0, le=1)
    """How good the reply was, 0 (bad) to 1 (good); or thumbs."""
    thumbs: Literal["up", "down"] | None = None
    """up (1) or down (0); or score."""
    comment: str | None = None
    """Free text for the operator (never logged)."""

    @model_validator(mode="after")
    def _one_judgement(self):
        if (self.score is None) == (self.thumbs is None):
            raise ValueError("give exactly one of score (0..1) or thumbs (up or down)")
        return self

    @property
    def value(self) -> float:
        return self.score if self.score is not None else float(self.thumbs == "up")


@dataclass
class Tally:
    responses: int = 0
    score_sum: float = 0.0

    def as_dict(self) -> dict:
        return {"responses": self.responses, "mean_score": self.score_sum / self.responses if self.responses else None}


class FeedbackBook:
    """Response ids of recent replies -> (served model, its feedback score), and the tallies per served model."""

    def __init__(self, config: FeedbackConfig):
        self.config = config
        self._responses: OrderedDict[str, list] = OrderedDict()  # id -> [served name, score or None]
        self.tallies: dict[str, Tally] = {}
        self._lock = threading.Lock()

    def answered(self, response_id: str, served: str) -> None:
        with self._lock:
            self._responses[response_id] = [served, None]
            while len(self._responses) > self.config.remembered_responses:
                self._responses.popitem(last=False)

    def record(self, body: bytes) -> tuple[str, FeedbackRequest]:
        """Count one feedback body; returns (served name, request). Raises ApiError 400 for a malformed body, 404
        for a response id this server does not remember."""
        request = parse_request(body, FeedbackRequest)
        if request.comment is not None and len(request.comment) > self.config.max_comment_chars:
            raise ApiError(400, f"comment: at most {self.config.max_comment_chars} characters", "invalid_request",
                           param="comment")
        with self._lock:
            entry = self._responses.get(request.response_id)
            if entry is None:
                raise ApiError(404, f"response_id {request.response_id!r}: no reply of this server has that id "
                                    "(or it is too old to remember)", "response_not_found", param="response_id")
            served, previous = entry
            tally = self.tallies.setdefault(served, Tally())
            if previous is None:
                tally.responses += 1
            else:
                tally.score_sum -= previous  # a second judgement of one reply replaces the first
            tally.score_sum += request.value
            entry[1] = request.value
        self._append(served, request)
        return served, request

    def _append(self, served: str, request: FeedbackRequest) -> None:
        if self.config.log_file is None:
            return
        line = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "served": served,
                **request.model_dump(), "value": request.value}
        with self._lock, Path(self.config.log_file).open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")

    def summary(self) -> dict[str, dict]:
        with self._lock:
            return {served: tally.as_dict() for served, tally in self.tallies.items()}
