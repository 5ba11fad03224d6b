"""`dsft serve` end to end on tiny runs: the official openai client against a server started here (uvicorn in a
thread on a free loopback port), batched replies equal to each prompt alone, a bounded load test, metrics, bad input,
API keys, the cache, two LoRA adapters on one base, the canary split, timeouts, and the continuous engine."""

import concurrent.futures
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from dsft.config import load_config
from dsft.config.serve import load_serve_config
from dsft.data.formats import Message
from dsft.errors import DsftError
from dsft.models.load import load_run
from dsft.serve.batcher import QueueFull
from dsft.models.generate import DecodeSettings, generate_batch, prompt_ids, split_reasoning
from dsft.serve.canary import Canary
from dsft.serve.models import ServedModel, ServedModels, load_served
from dsft.serve.server import create_app, serve_in_thread
from dsft.train.sft import run_sft

from .conftest import make_config

PROMPTS = ["Convert 37 km to m.", "把 58 千克换算成克。", "Convert 4200 cm to m.", "把 7 元换算成角。", "hello", "Convert 9 m to cm."]
CANARY = {"alias": "prod", "primary": "a", "candidate": "b", "percent": 30, "seed": 0, "rollback_on": []}
SHARED = ["serve.model_name=a", "serve.cache.max_entries=64", "serve.limits.max_prompt_tokens=64",
          "serve.limits.max_tokens=32", "serve.limits.max_body_bytes=4096", "serve.batching.max_wait_ms=20",
          f"serve.canary={json.dumps(CANARY)}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data) -> dict:
    """Two LoRA runs on one tiny-deepseek-v3 base (same seed and data, different learning rates) and a full
    tiny-qwen2 run (standard attention, for the continuous engine)."""
    root = tmp_path_factory.mktemp("serve-runs")
    made = {}
    for name, sections in (("a", {}), ("b", {"train": {"learning_rate": 1e-2}}),
                           ("qwen", {"model": {"preset": "tiny-qwen2"}, "method": {"type": "full"}})):
        (root / name).mkdir()
        made[name] = run_sft(load_config(make_config(root / name, tiny_data, **sections))).run_dir
    return made


@pytest.fixture(scope="module")
def references(runs) -> dict:
    """Each run loaded alone: name -> (model, tokenizer, template)."""
    loaded = {}
    for name, run_dir in runs.items():
        model, tokenizer, config = load_run(run_dir)
        loaded[name] = (model, tokenizer, config.data.chat_template)
    return loaded


def alone(references, name: str, prompt: str, max_tokens: int) -> str:
    """The answer `dsft generate` gives: this prompt alone, greedy."""
    model, tokenizer, template = references[name]
    ids = prompt_ids([Message("user", prompt)], template, tokenizer)
    reply = generate_batch(model, tokenizer, [ids], DecodeSettings(max_new_tokens=max_tokens))[0]
    return split_reasoning(reply)[1]


@pytest.fixture(scope="module")
def server(runs):
    """Run a (named "a") with run b as adapter "b", the canary alias "prod", a cache and tight limits."""
    config = load_serve_config(None, [*SHARED, f"serve.adapters={{b: {runs['b']}}}"])
    app = create_app(load_served(str(runs["a"]), config), config)
    with serve_in_thread(app) as url:
        yield url


def client(url: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def metric(url: str, name: str, headers: dict | None = None, **labels) -> float:
    """Sum of the samples called name whose labels include labels, from GET /metrics."""
    text = httpx.get(f"{url}/metrics", headers=headers).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def post(url: str, path: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json", **(headers or {})},
                      timeout=60)


def chat_body(prompt: str = PROMPTS[0], model: str = "a", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, **extra}


def test_openai_client_plain_and_streaming_chat_completions_and_models(server, references, caplog):
    caplog.set_level(logging.INFO, logger="dsft.serve")
    api = client(server)
    assert [model.id for model in api.models.list().data] == ["a", "b", "prod"]
    reply = api.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPTS[0]}],
                                        temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == alone(references, "a", PROMPTS[0], 12)
    assert reply.model == "a" and reply.usage.prompt_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")
    stream = api.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0,
                                         max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == reply.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    text = api.completions.create(model="a", prompt="Convert 5 km", temperature=0, max_tokens=6)
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="a", prompt="Convert 5 km", temperature=0, max_tokens=6, stream=True))
    assert streamed == text.choices[0].text and text.object == "text_completion"
    assert PROMPTS[0] not in caplog.text and "served=a status=200" in caplog.text  # no prompts in the log


def test_concurrent_requests_are_batched_and_equal_each_prompt_alone(server, references):
    api = client(server)
    batches_before = metric(server, "dsft_serve_batch_size_count")
    asks = [(prompt, 4 + i % 3 * 4) for i, prompt in enumerate(PROMPTS * 3)]

    def ask(item):
        prompt, max_tokens = item
        return api.chat.completions.create(model="a", messages=[{"role": "user", "content": prompt}], temperature=0,
                                           max_tokens=max_tokens).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        replies = list(pool.map(ask, asks))
    assert replies == [alone(references, "a", prompt, max_tokens) for prompt, max_tokens in asks]
    batches = metric(server, "dsft_serve_batch_size_count") - batches_before
    assert 1 <= batches < len(asks)  # some requests shared a batch


def test_load_of_200_requests_from_32_clients_loses_none_and_metrics_count_them(server):
    before = {name: metric(server, name) for name in ("dsft_serve_requests_total", "dsft_serve_errors_total")}
    generated_before = metric(server, "dsft_serve_generated_tokens_total")

    def one(i: int) -> tuple[int, str]:
        stream = i % 4 == 0
        body = chat_body(PROMPTS[i % len(PROMPTS)], model="a" if i % 3 else "b", max_tokens=4, stream=stream,
                         temperature=0.7 if i % 2 else 0)
        response = post(server, "/v1/chat/completions", body)
        done = response.text.rstrip().endswith("data: [DONE]") if stream else "choices" in response.json()
        return response.status_code, "ok" if done and '"error"' not in response.text else response.text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(200)))
    assert results == [(200, "ok")] * 200
    assert metric(server, "dsft_serve_requests_total") - before["dsft_serve_requests_total"] == 200
    assert metric(server, "dsft_serve_errors_total") == before["dsft_serve_errors_total"]
    assert metric(server, "dsft_serve_generated_tokens_total") > generated_before
    assert metric(server, "dsft_serve_queue_depth") == 0
    for name in ("dsft_serve_request_latency_seconds_count", "dsft_serve_time_to_first_token_seconds_count",
                 "dsft_serve_tokens_per_second_count", "dsft_serve_step_latency_seconds_count"):
        assert metric(server, name) > 0, name


BAD = [
    (b'{"model": "a", "messages": [', 400, None),
    (b'"just a string"', 400, None),
    (chat_body(max_tokens="8"), 400, "max_tokens"),
    (chat_body(max_tokens=-1), 400, "max_tokens"),
    (chat_body(max_tokens=0), 400, "max_tokens"),
    ({"model": "a", "messages": []}, 400, "messages"),
    ({"model": "a", "messages": [{"role": "user"}, {"role": "system", "content": "late"}]}, 400, "messages"),
    (chat_body(temperature="hot"), 400, "temperature"),
    (chat_body(max_tokens=33), 400, "max_tokens"),
    (chat_body(max_completion_tokens=33), 400, "max_completion_tokens"),
    (chat_body(prompt="word " * 200), 400, "messages"),
    (chat_body(n=3), 400, "n"),
    (chat_body(logprobs=True), 400, "logprobs"),
    (chat_body(model="nope"), 404, "model"),
    (json.dumps(chat_body(prompt="x" * 5000)).encode(), 413, None),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_gets_a_4xx_with_an_openai_error_body_and_the_server_keeps_serving(server, body, status, param):
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert post(server, "/v1/chat/completions", chat_body(max_tokens=2)).status_code == 200
    assert metric(server, "dsft_serve_errors_total", kind="internal") == 0


def test_other_routes_and_methods_answer_openai_errors(server):
    assert httpx.get(f"{server}/v1/chat/completions").status_code == 405
    missing = httpx.get(f"{server}/v1/files/..%2f..%2fetc%2fpasswd")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "queue_depth": 0}


def test_unknown_model_is_404_listing_the_served_names(server):
    response = post(server, "/v1/completions", {"model": "../../etc/passwd", "prompt": "x"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert "served models: a, b, prod" in response.json()["error"]["message"]


def test_greedy_replies_are_cached_and_sampled_ones_are_not(server):
    hits, misses = metric(server, "dsft_serve_cache_hits_total"), metric(server, "dsft_serve_cache_misses_total")
    body = chat_body("Convert 123 km to m.", max_tokens=7)
    first, second = post(server, "/v1/chat/completions", body).json(), post(server, "/v1/chat/completions", body).json()
    assert first["choices"] == second["choices"] and first["usage"] == second["usage"]
    assert metric(server, "dsft_serve_cache_misses_total") - misses == 1
    assert metric(server, "dsft_serve_cache_hits_total") - hits == 1
    post(server, "/v1/chat/completions", {**body, "temperature": 0.8})
    assert metric(server, "dsft_serve_cache_hits_total") - hits == 1
    assert metric(server, "dsft_serve_cache_misses_total") - misses == 1


def test_two_lora_adapters_on_one_base_answer_as_each_run_alone(server, references):
    api = client(server)
    answers = {}
    for name in ("a", "b"):
        answers[name] = []
        for prompt in PROMPTS:
            response = api.chat.completions.with_raw_response.create(
                model=name, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=10)
            assert response.headers["x-dsft-model"] == name
            answers[name].append(response.parse().choices[0].message.content)
        assert answers[name] == [alone(references, name, prompt, 10) for prompt in PROMPTS]
    assert answers["a"] != answers["b"]


def test_canary_alias_splits_as_the_seeded_router_and_names_the_version(server):
    refused = [post(server, "/v1/completions", {"model": "prod", "prompt": "x", "max_tokens": 33}) for _ in range(3)]
    assert [response.status_code for response in refused] == [400] * 3  # neither counted nor drawn
    served = [post(server, "/v1/completions", {"model": "prod", "prompt": "x", "max_tokens": 1}).headers["x-dsft-model"]
              for _ in range(40)]
    router = Canary(load_serve_config(None, SHARED).canary)
    assert served == [router.route() for _ in range(40)]
    assert 0 < served.count("b") < 40
    assert metric(server, "dsft_serve_routed_requests_total", requested="prod", served="b") == served.count("b")
    assert metric(server, "dsft_serve_routed_requests_total", requested="prod", served="a") == served.count("a")


def test_api_keys_are_required_and_never_logged(runs, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("DSFT_TEST_SERVE_KEY", "k-123-secret")
    config = load_serve_config(None, ["serve.api_keys=['${DSFT_TEST_SERVE_KEY}']", "serve.log_prompts=true"])
    with serve_in_thread(create_app(load_served(str(runs["a"]), config), config)) as url:
        body = chat_body(model="run", max_tokens=2)
        assert post(url, "/v1/chat/completions", body).status_code == 401
        wrong = post(url, "/v1/chat/completions", body, headers={"authorization": "Bearer k-123-secreT"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/v1/models").status_code == 401 and httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.post(f"{url}/v1/feedback", json={"response_id": "x", "score": 1}).status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        reply = client(url, "k-123-secret").chat.completions.create(
            model="run", messages=[{"role": "user", "content": PROMPTS[1]}], temperature=0, max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(Exception, match="401"):
            client(url, "nope").models.list()
        assert metric(url, "dsft_serve_errors_total", {"authorization": "Bearer k-123-secret"}, kind="auth") == 6
    assert "k-123-secret" not in caplog.text
    assert PROMPTS[1] in caplog.text  # log_prompts: true logs them


class StandIn:
    """An engine that answers each job with the events of `script` (none: it never answers)."""

    def __init__(self, script=None, full: bool = False):
        self.script, self.full = script, full
        self.jobs = []

    def start(self):
        pass

    def stop(self):
        pass

    def queue_depth(self) -> int:
        return 0

    def submit(self, job):
        self.jobs.append(job)
        if self.full:
            raise QueueFull
        for event in self.script or []:
            job.deliver(event)


@pytest.fixture(scope="module")
def served_a(runs):
    return load_served(str(runs["a"]), load_serve_config(None))


def test_timeout_queue_full_and_failed_generation_are_openai_errors(served_a):
    config = load_serve_config(None, ["serve.limits.request_timeout_s=0.3"])
    body = chat_body(model="run", max_tokens=4)
    cases = [(StandIn(), 504, "timeout"), (StandIn(full=True), 503, "server_overloaded"),
             (StandIn([("token", 5), ("error", "generation failed: RuntimeError")]), 500, None)]
    for engine, status, code in cases:
        with serve_in_thread(create_app(served_a, config, engine=engine)) as url:
            response = post(url, "/v1/chat/completions", body)
            assert response.status_code == status and response.json()["error"]["code"] == code
            if status != 503:
                events = post(url, "/v1/chat/completions", {**body, "stream": True}).text
                assert '"error"' in events and events.rstrip().endswith("data: [DONE]")
            assert httpx.get(f"{url}/health").status_code == 200


def test_a_client_that_leaves_a_plain_request_cancels_its_generation(served_a):
    engine = StandIn()  # never answers: the generation runs until cancelled
    with serve_in_thread(create_app(served_a, load_serve_config(None), engine=engine)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=chat_body(model="run", max_tokens=4), timeout=0.5)
        for _ in range(40):  # the server polls the connection every DISCONNECT_POLL_S
            if engine.jobs[0].cancelled.is_set():
                break
            threading.Event().wait(0.1)
        assert engine.jobs[0].cancelled.is_set()
        assert metric(url, "dsft_serve_errors_total", kind="client_disconnected") == 1
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_client_that_leaves_a_stream_cancels_its_generation_and_is_counted(served_a, caplog):
    caplog.set_level(logging.INFO, logger="dsft.serve")
    engine = StandIn()  # never answers: the generation runs until cancelled
    with serve_in_thread(create_app(served_a, load_serve_config(None), engine=engine)) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat_body(model="run", stream=True)) as response:
            assert next(response.iter_lines()).startswith("data: ")  # the role chunk; then the client leaves
        for _ in range(40):
            if metric(url, "dsft_serve_requests_total", status="499") == 1:
                break
            threading.Event().wait(0.1)
        assert metric(url, "dsft_serve_requests_total", status="499") == 1
        assert metric(url, "dsft_serve_errors_total", kind="client_disconnected") == 1
        assert engine.jobs[0].cancelled.is_set()
    assert "status=499" in caplog.text


def test_tokens_after_a_stop_string_are_not_counted(served_a):
    """The engine goes on for a few tokens before it sees the cancellation: the usage counts up to the stop."""
    tokenizer = served_a.tokenizer
    ids = tokenizer.encode("one two! three four five", add_special_tokens=False)
    through_stop = next(k for k in range(1, len(ids) + 1) if "!" in tokenizer.decode(ids[:k]))
    engine = StandIn([("token", i) for i in ids] + [("end", "length")])
    with serve_in_thread(create_app(served_a, load_serve_config(None), engine=engine)) as url:
        reply = client(url).chat.completions.create(model="run", messages=[{"role": "user", "content": "hi"}],
                                                    temperature=0.5, stop="!")
        assert reply.choices[0].message.content == "one two" and reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens == through_stop < len(ids)
        chunks = list(client(url).chat.completions.create(
            model="run", messages=[{"role": "user", "content": "hi"}], temperature=0.5, stop="!", stream=True,
            stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == through_stop


def test_the_reply_budget_fits_the_model_s_context(served_a):
    engine = StandIn([("end", "stop")])
    app = create_app(served_a, load_serve_config(None), engine=engine)
    app.state.dsft.context_tokens = 40  # the preset's is 4,096, more than the default caps ask for
    with serve_in_thread(app) as url:
        prompt_tokens = post(url, "/v1/chat/completions", chat_body(model="run", max_tokens=1)).json()["usage"][
            "prompt_tokens"]
        assert post(url, "/v1/chat/completions", chat_body(model="run")).status_code == 200
        assert engine.jobs[-1].max_new_tokens == 40 - prompt_tokens  # the default budget, cut to what is left
        assert post(url, "/v1/chat/completions", chat_body(model="run", max_tokens=40 - prompt_tokens)).status_code == 200
        over = post(url, "/v1/chat/completions", chat_body(model="run", max_tokens=41 - prompt_tokens))
        assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
        assert over.json()["error"]["code"] == "context_length_exceeded"
        long = post(url, "/v1/chat/completions", chat_body("word " * 60, model="run"))
        assert long.status_code == 400 and long.json()["error"]["param"] == "messages"


def test_a_body_that_does_not_arrive_in_time_is_a_408(served_a):
    config = load_serve_config(None, ["serve.limits.request_timeout_s=0.5"])

    def trickle():
        yield b'{"model": "run", '
        time.sleep(1.5)
        yield b'"messages": [{"role": "user", "content": "hi"}]}'

    with serve_in_thread(create_app(served_a, config, engine=StandIn([("end", "stop")]))) as url:
        response = httpx.post(f"{url}/v1/chat/completions", content=trickle(), timeout=10)
        assert response.status_code == 408 and response.json()["error"]["code"] == "timeout"
        assert post(url, "/v1/chat/completions", chat_body(model="run")).status_code == 200


def test_reasoning_goes_in_reasoning_content_plain_and_streamed(served_a):
    """An R1-style prompt opens the think block, so the reply starts with reasoning; a v3-style reply opens it."""
    tokenizer = served_a.tokenizer
    both = ServedModels(served_a.model, tokenizer, [ServedModel("r1", None, "deepseek_r1", "test"),
                                                    ServedModel("v3", None, "deepseek_v3", "test")])
    replies = {"r1": "add 5\n</think>\n\n42 m", "v3": "<think>\nadd 5\n</think>\n\n42 m"}
    for name, reply in replies.items():
        script = [("token", i) for i in tokenizer.encode(reply, add_special_tokens=False)] + [("end", "stop")]
        with serve_in_thread(create_app(both, load_serve_config(None), engine=StandIn(script))) as url:
            message = client(url).chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], temperature=0.5).choices[0].message
            assert (message.reasoning_content, message.content) == ("add 5", "42 m")
            chunks = list(client(url).chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], temperature=0.5, stream=True))
            deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
            reasoning = "".join(getattr(delta, "reasoning_content", None) or "" for delta in deltas)
            assert (reasoning.strip(), "".join(delta.content or "" for delta in deltas).strip()) == ("add 5", "42 m")


def test_a_plain_model_directory_is_served(runs, tmp_path):
    """A directory with a Hugging Face model and no dsft config.yaml (as `dsft export` writes) serves too."""
    plain = tmp_path / "plain"
    shutil.copytree(runs["qwen"], plain, ignore=shutil.ignore_patterns("config.yaml", "checkpoints"))
    config = load_serve_config(None)
    with serve_in_thread(create_app(load_served(str(plain), config), config)) as url:
        response = post(url, "/v1/chat/completions", chat_body(model="plain", max_tokens=3))
        assert response.status_code == 200 and response.headers["x-dsft-model"] == "plain"


def test_continuous_engine_gives_the_static_engine_s_greedy_replies(runs, references, served_a):
    config = load_serve_config(None, ["serve.batching.engine=continuous", "serve.model_name=qwen"])
    with serve_in_thread(create_app(load_served(str(runs["qwen"]), config), config)) as url:
        api = client(url)

        def ask(prompt):
            return api.chat.completions.create(model="qwen", messages=[{"role": "user", "content": prompt}],
                                               temperature=0, max_tokens=8).choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            replies = list(pool.map(ask, PROMPTS))
        assert replies == [alone(references, "qwen", prompt, 8) for prompt in PROMPTS]
        sampled = post(url, "/v1/chat/completions", chat_body(model="qwen", temperature=0.5))
        assert sampled.status_code == 400 and "greedy" in sampled.json()["error"]["message"]
    with pytest.raises(DsftError, match="MLA"):
        create_app(served_a, config)


def test_cli_serves_until_stopped(runs):
    """The real `dsft serve` command in its own process, on a free port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dsft.cli", "serve", str(runs["a"]), "--port", "0",
                                "--set", "serve.model_name=quick"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url, lines = None, []
        timer = threading.Timer(120, process.kill)
        timer.start()
        for line in process.stderr:
            lines.append(line)
            if found := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line):
                url = found.group(1)
                break
        timer.cancel()
        assert url is not None, "".join(lines)
        reply = post(url, "/v1/chat/completions", chat_body(model="quick", max_tokens=2))
        assert reply.status_code == 200 and reply.headers["x-dsft-model"] == "quick"
    finally:
        process.terminate()
        process.wait(30)
    bad = subprocess.run([sys.executable, "-m", "dsft.cli", "serve", str(runs["a"]), "--set", "serve.api_keys=[k]"],
                         check=False, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "environment reference" in bad.stderr and "Traceback" not in bad.stderr
