"""Releases through `dsft serve`: serving registry:NAME@ALIAS with its deployment log (across a killed server and a
restart), user feedback, a shadow candidate, and a progressive canary that steps up or rolls back, on two tiny
runs (one right, one trained to answer wrongly), with the official openai client and a real MLflow store."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from dsft.cli import app
from dsft.config.serve import load_serve_config
from dsft.serve.models import load_served
from dsft.serve.server import create_app, serve_in_thread
from tests.recipes.lifecycle_runs import RIGHT, train_lifecycle_runs

pytest.importorskip("mlflow")

PROMPTS = ["Convert 37 km to m.", "把 58 千克换算成克。", "Convert 4200 cm to m.", "把 7 元换算成角。"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("release")
    trained = train_lifecycle_runs(root, tiny_data["train"], tracking_for_right=False)
    trained["store"] = f"sqlite:///{root / 'registry.db'}"
    for name, alias in (("right", "production"), ("wrong", "candidate")):
        runner = CliRunner()
        assert runner.invoke(app, ["registry", "register", str(trained[name]), "--name", "support",
                                   "--store", trained["store"]]).exit_code == 0
        version = "1" if name == "right" else "2"
        assert runner.invoke(app, ["registry", "promote", "support", version, "--alias", alias,
                                   "--store", trained["store"]]).exit_code == 0
    return trained


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def ask(url: str, model: str, prompt: str = PROMPTS[0]):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=12)


def answer(raw) -> str:
    return raw.parse().choices[0].message.content


def serve_config(runs, *overrides):
    return load_serve_config(None, [f"serve.registry_uri={runs['store']}", "serve.cache.max_entries=0", *overrides])


def deployments(runs, version: str = "1") -> list[dict]:
    from dsft.lifecycle.registry import Registry

    registry = Registry(runs["store"])
    return registry.deployments(registry.version(f"support@{version}"))


def _start_cli_server(runs, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": runs["store"]}
    server = subprocess.Popen([sys.executable, "-m", "dsft.cli", "serve", "registry:support@production", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        assert server.poll() is None, server.stderr.read()[-3000:]
        time.sleep(0.3)
    server.kill()
    pytest.fail("dsft serve did not answer /health in 180 s")


def test_serve_registry_alias_logs_each_deployment_across_a_kill_and_a_restart(runs):
    port = free_port()
    first = _start_cli_server(runs, port)
    reply = ask(f"http://127.0.0.1:{port}", "support")
    assert answer(reply) == RIGHT and reply.headers["x-dsft-model"] == "support"
    (entry,) = deployments(runs)
    assert entry["end"] is None and entry["port"] == port and entry["served_as"] == "support"
    first.kill()  # no chance to close its entry
    first.wait(30)
    second = _start_cli_server(runs, port)
    assert answer(ask(f"http://127.0.0.1:{port}", "support")) == RIGHT
    second.send_signal(signal.SIGINT)  # a clean stop closes its own entry
    assert second.wait(60) == 0, second.stderr.read()[-3000:]
    killed, stopped = deployments(runs)
    assert killed["ended"].startswith("not closed by its server") and killed["end"] == stopped["start"]
    assert stopped["ended"] == "stopped" and stopped["requests"] == 1 and stopped["end"] >= stopped["start"]


def test_feedback_is_counted_per_version_replaced_and_refused_when_malformed(runs):
    config = serve_config(runs)
    with serve_in_thread(create_app(load_served("registry:support@production", config), config)) as url:
        reply = ask(url, "support").parse()
        post = lambda body: httpx.post(f"{url}/v1/feedback", json=body)
        assert post({"response_id": reply.id, "thumbs": "down", "comment": "wrong unit"}).json()["value"] == 0.0
        assert metric(url, "dsft_serve_feedback_mean_score", model="support") == 0.0
        assert post({"response_id": reply.id, "score": 0.75}).status_code == 200  # replaces the thumbs down
        assert metric(url, "dsft_serve_feedback_mean_score", model="support") == 0.75
        assert metric(url, "dsft_serve_feedback_responses", model="support") == 1
        refused = [post({"response_id": "chatcmpl-nope", "score": 1}), post({"response_id": reply.id}),
                   post({"response_id": reply.id, "score": 1, "thumbs": "up"}), post({"response_id": reply.id,
                   "score": 2}), post({"response_id": reply.id, "thumbs": "up", "comment": "x" * 2001}),
                   httpx.post(f"{url}/v1/feedback", content=b"{not json")]
        assert [r.status_code for r in refused] == [404, 400, 400, 400, 400, 400]
        assert [r.json()["error"]["param"] for r in refused] == ["response_id", None, None, "score", "comment", None]
    # The deployment's entry in the registry closes with the version's feedback.
    assert deployments(runs)[-1]["feedback"] == {"responses": 1, "mean_score": 0.75}
    from dsft.lifecycle.registry import Registry
    from dsft.lifecycle.registry_views import describe_version

    assert describe_version(Registry(runs["store"]), "support@1")["feedback"] == {"responses": 1, "mean_score": 0.75}


def test_a_shadow_candidate_answers_in_the_background_and_is_compared(runs, tmp_path):
    report = tmp_path / "shadow.jsonl"
    shadow = {"primary": "support", "candidate": "cand", "percent": 100, "report_file": str(report)}
    config = serve_config(runs, "serve.adapters={cand: registry:support@candidate}", f"serve.shadow={json.dumps(shadow)}")
    served = load_served("registry:support@production", config)
    app_ = create_app(served, config)
    with serve_in_thread(app_) as url:
        replies = [ask(url, "support", prompt) for prompt in PROMPTS]
        assert [answer(r) for r in replies] == [RIGHT] * 4 and {r.headers["x-dsft-model"] for r in replies} == {"support"}
        deadline = time.monotonic() + 60
        while metric(url, "dsft_serve_shadow_requests_total", outcome="compared") < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(url, "dsft_serve_shadow_requests_total", outcome="compared") == 4
        assert metric(url, "dsft_serve_shadow_exact_matches_total") == 0  # the candidate answers WRONG
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(lines) == 4 and {line["exact_match"] for line in lines} == {0.0}
    assert all("prompt" not in line and RIGHT not in json.dumps(line) for line in lines)  # no text without log_prompts
    summary = json.loads(report.with_suffix(".summary.json").read_text())
    assert summary["compared"] == 4 and summary["exact_match"] == 0.0 and summary["errors"] == 0


class SplitEngine:
    """Answers the primary's jobs at once with token 1 then end; the candidate's as `candidate` says: "error" or
    "hold" (nothing until release() - a candidate slower than any client would wait)."""

    def __init__(self, candidate: str):
        self.candidate, self.held = candidate, []

    def start(self):
        pass

    def stop(self):
        pass

    def queue_depth(self):
        return 0

    def submit(self, job):
        if job.model != "cand":
            job.deliver(("token", 1)), job.deliver(("end", "stop"))
        elif self.candidate == "error":
            job.deliver(("error", "the candidate crashed"))
        else:
            assert job.background
            self.held.append(job)

    def release(self):
        for job in self.held:
            job.deliver(("token", 2)), job.deliver(("end", "stop"))


@pytest.mark.parametrize("behaviour", ["error", "hold"])
def test_a_failing_or_slow_shadow_never_touches_the_primary_s_replies(runs, tmp_path, behaviour):
    shadow = {"primary": "support", "candidate": "cand", "percent": 100, "max_in_flight": 2,
              "report_file": str(tmp_path / "shadow.jsonl")}
    config = serve_config(runs, "serve.adapters={cand: registry:support@candidate}", f"serve.shadow={json.dumps(shadow)}")
    engine = SplitEngine(behaviour)
    with serve_in_thread(create_app(load_served("registry:support@production", config), config, engine=engine)) as url:
        replies = [ask(url, "support", prompt) for prompt in PROMPTS]
        assert [r.status_code for r in replies] == [200] * 4  # all answered while every shadow failed or waits
        if behaviour == "error":
            assert metric(url, "dsft_serve_shadow_requests_total", outcome="error") == 4
        else:
            # Two shadows wait in flight; the other two requests were not shadowed.
            assert len(engine.held) == 2 and metric(url, "dsft_serve_shadow_requests_total", outcome="skipped") == 2
            engine.release()
            deadline = time.monotonic() + 30
            while metric(url, "dsft_serve_shadow_requests_total", outcome="compared") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert metric(url, "dsft_serve_shadow_requests_total", outcome="compared") == 2


def canary_config(runs, **canary):
    settings = {"alias": "prod", "primary": "support", "candidate": "cand", "seed": 0, "min_requests": 4, **canary}
    return serve_config(runs, "serve.adapters={cand: registry:support@candidate}", f"serve.canary={json.dumps(settings)}")


def test_a_progressive_canary_steps_up_while_its_metrics_hold(runs):
    config = canary_config(runs, steps=[25, 50, 100], step_after_requests=2, rollback_on=["error_rate"], seed=1)
    with serve_in_thread(create_app(load_served("registry:support@production", config), config)) as url:
        percents, served = [], []
        for i in range(30):
            served.append(ask(url, "prod", PROMPTS[i % 4]).headers["x-dsft-model"])
            percents.append(metric(url, "dsft_serve_canary_percent", alias="prod"))
        assert sorted(set(percents)) == [25, 50, 100] and percents == sorted(percents)
        assert percents[-1] == 100 and served[-5:] == ["cand"] * 5
        assert metric(url, "dsft_serve_canary_rollbacks_total") == 0


@pytest.mark.parametrize("watch", ["checks", "feedback"])
def test_a_canary_rolls_back_when_the_candidate_is_worse(runs, watch):
    from dsft.lifecycle.registry import Registry

    config = canary_config(runs, steps=[50, 100], step_after_requests=1000, rollback_on=[watch],
                           checks=[{"name": "says_42", "regex": "42"}])
    with serve_in_thread(create_app(load_served("registry:support@production", config), config)) as url:
        served = []
        for i in range(30):
            raw = ask(url, "prod", PROMPTS[i % 4])
            served.append(raw.headers["x-dsft-model"])
            if watch == "feedback":  # users dislike the wrong answers
                reply = raw.parse()
                thumbs = "up" if reply.choices[0].message.content == RIGHT else "down"
                assert httpx.post(f"{url}/v1/feedback", json={"response_id": reply.id, "thumbs": thumbs}).status_code == 200
        # Half the traffic went to the candidate until both sides had 4 samples; then none.
        assert served.count("cand") >= 4 and served[-10:] == ["support"] * 10
        assert metric(url, "dsft_serve_canary_percent", alias="prod") == 0
        assert metric(url, "dsft_serve_canary_rollbacks_total", candidate="cand") == 1
        assert "42" not in answer(ask(url, "cand"))  # the candidate itself is still served by name
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        events = [e for e in Registry(runs["store"]).events("support") if e["kind"] == "rollback"]
        if len(events) >= (1 if watch == "checks" else 2):
            break
        time.sleep(0.1)
    assert events[-1]["version"] == "2" and events[-1]["reason"].startswith("check says_42" if watch == "checks"
                                                                            else "feedback")
