"""What a server does for releases, around the requests it answers: the canary (routing, live watch, rollback),
the shadow (background answers compared with the primary's), user feedback and the registry's deployment log.
handling.App calls it when a request is resolved, answered or failed, and the lifespan starts and stops it."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time

from dsft.config.serve import ServeConfig
from dsft.errors import DsftError
from dsft.serve.canary import Canary
from dsft.serve.deployments import Deployments
from dsft.serve.feedback import FeedbackBook
from dsft.serve.metrics import ServeMetrics
from dsft.serve.models import ServedModels
from dsft.serve.openai_schema import ApiError, new_id
from dsft.serve.reply_text import prompt_opens_thinking, split_reply
from dsft.serve.shadow import Shadow

log = logging.getLogger("dsft.serve")


class Release:
    def __init__(self, state, served: ServedModels, config: ServeConfig, metrics: ServeMetrics):
        self.state, self.metrics = state, metrics  # state: the App, whose queue the shadow's jobs go through
        self.deployments = Deployments(served, config.registry_uri, config.host, config.port)
        self.canary = None
        if served.canary is not None:
            alias, candidate = served.canary.alias, served.canary.candidate
            self.canary = Canary(served.canary, metrics,
                                 lambda reason: self.deployments.rolled_back(candidate, alias, reason))
        self.checks = _online_checks(served.canary)
        self.shadow = Shadow(served.shadow, metrics, config.log_prompts) if served.shadow is not None else None
        self.feedback = FeedbackBook(config.feedback)
        self.answered: collections.Counter = collections.Counter()

    def route(self):
        """The canary's draw, for ServedModels.resolve (None without a canary)."""
        return self.canary.route if self.canary is not None else None

    # -- requests -------------------------------------------------------------------------------------------------
    def plan_shadow(self, state, parsed, call) -> None:
        """Render the shadow's prompt now (its own template) if the draw picks this request of the primary."""
        if self.shadow is None or not self.shadow.wanted(call.served.name):
            return
        candidate = state.served.by_name[self.shadow.config.candidate]
        try:
            ids, text, _ = state.prompt(parsed, candidate)
        except ApiError as error:  # the candidate's template refuses it: nothing to compare
            self.shadow.failed(error.kind)
            return
        call.shadow = (candidate, ids, text)

    def finished(self, call, status: int) -> None:
        """A generation request answered (status 200) or ended otherwise (a stream's error, a client that left)."""
        name = call.served.name
        latency_s = time.perf_counter() - call.started_s
        if status == 200:
            self.answered[name] += 1
            self.feedback.answered(call.request_id, name)
        if self.canary is not None:
            answer = split_reply("".join(call.text), call.opens_thinking)[1] if status == 200 else ""
            checks = self._check(answer, call.prompt_text) if status == 200 else None
            self.canary.observe(name, status, latency_s, checks)
        if status == 200 and call.shadow is not None:
            self._start_shadow(call, latency_s)

    def failed(self, served_name: str | None, status: int) -> None:
        """A request refused or failed after its model was resolved (the non-streamed error path)."""
        if self.canary is not None and served_name is not None:
            self.canary.observe(served_name, status, 0.0)

    def _check(self, answer: str, prompt: str) -> dict[str, float]:
        scores = {}
        for check in self.checks:
            try:
                scores[check.name] = float(check.function(answer, None, prompt))
            except Exception as exc:  # noqa: BLE001 - a user's check that raises fails the reply, never the request
                log.warning("canary check %s raised %s; counted as failed", check.name, type(exc).__name__)
                scores[check.name] = 0.0
        return scores

    def record_feedback(self, body: bytes) -> dict:
        served, request = self.feedback.record(body)
        tally = self.feedback.tallies[served]
        self.metrics.feedback_responses.labels(served).set(tally.responses)
        self.metrics.feedback_mean_score.labels(served).set(tally.score_sum / tally.responses)
        if self.canary is not None:
            self.canary.feedback(served, request.value)
        log.info("feedback response_id=%s served=%s", request.response_id, served)  # never the comment
        return {"object": "feedback", "response_id": request.response_id, "model": served, "value": request.value}

    # -- the shadow -----------------------------------------------------------------------------------------------
    def _start_shadow(self, call, latency_s: float) -> None:
        if not self.shadow.admit():
            return
        candidate, ids, text = call.shadow
        primary = {"answer": split_reply("".join(call.text), call.opens_thinking)[1],
                   "tokens": call.completion_tokens, "latency_s": latency_s, "prompt": call.prompt_text}
        # The same request for the candidate: its prompt, nothing of the primary's reply, never streamed.
        shadow_call = dataclasses.replace(
            call, request_id=new_id("shadow"), served=candidate, prompt_ids=ids, stream=False, include_usage=False,
            opens_thinking=prompt_opens_thinking(text), started_s=time.perf_counter(), prompt_text=text,
            finish_reason="stop", completion_tokens=0, first_token_s=None, last_token_s=None, cache_hit=False,
            text=[], shadow=None)
        task = asyncio.get_running_loop().create_task(self._run_shadow(call.request_id, shadow_call, primary))
        self.shadow.tasks.add(task)
        task.add_done_callback(self.shadow.tasks.discard)

    async def _run_shadow(self, request_id: str, shadow_call, primary: dict) -> None:
        try:
            job, events = self.state.submit(shadow_call, background=True)
            async for _ in self.state.pieces(shadow_call, job, events):
                pass
            answer = split_reply("".join(shadow_call.text), shadow_call.opens_thinking)[1]
            self.shadow.compare(request_id, primary, {"answer": answer, "tokens": shadow_call.completion_tokens,
                                                      "latency_s": time.perf_counter() - shadow_call.started_s})
        except ApiError as error:
            self.shadow.failed(error.kind)
        except Exception as exc:  # noqa: BLE001 - whatever the candidate does stays in the shadow's counters
            self.shadow.failed(type(exc).__name__)
        finally:
            self.shadow.done()

    # -- lifespan -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.deployments.start()

    async def stop(self) -> None:
        if self.shadow is not None:
            for task in list(self.shadow.tasks):
                task.cancel()
            await asyncio.gather(*self.shadow.tasks, return_exceptions=True)
            log.info("shadow report: %s", self.shadow.write_summary())
        self.deployments.stop(dict(self.answered), self.feedback.summary())


def _online_checks(canary):
    if canary is None or not canary.checks:
        return []
    from dsft.eval.text_metrics import load_checks

    try:
        return load_checks(canary.checks)
    except DsftError as exc:
        raise DsftError(f"serve.canary.checks: {exc}") from None
