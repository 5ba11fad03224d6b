"""Pure pieces of `dsft serve`: the batch-size controller, the queue's grouping, the cache, the canary router, reply
text (stop strings, reasoning split), request validation and the serve config."""

import threading
import time

import pytest

from dsft.config.serve import BatchingConfig, CanaryConfig, load_serve_config
from dsft.errors import DsftError
from dsft.serve.batcher import Batcher, Job, LatencyController, QueueFull, Sampling
from dsft.serve.cache import CachedReply, ReplyCache
from dsft.serve.handling import sampling_of
from dsft.serve.metrics import ServeMetrics
from dsft.serve.canary import Canary
from dsft.serve.openai_schema import ApiError, ChatCompletionRequest, CompletionRequest, parse_request
from dsft.serve.reply_text import ReasoningStream, ReplyText, split_reply


def test_controller_settles_where_step_latency_meets_the_target():
    """Plant: a step takes 2 ms + 0.5 ms per request; the target 10 ms is met at 16 requests."""
    config = BatchingConfig(min_batch=1, max_batch=64, target_latency_ms=10.0)
    controller = LatencyController(config)
    limits = []
    for _ in range(60):
        batch = controller.batch_limit  # the queue is always full
        limits.append(controller.update(batch, 2.0 + 0.5 * batch))
    assert limits[0] < 64
    assert all(15 <= limit <= 17 for limit in limits[-10:])


def test_controller_stays_in_bounds_and_an_unfull_batch_does_not_grow_the_limit():
    config = BatchingConfig(min_batch=2, max_batch=8, target_latency_ms=10.0)
    controller = LatencyController(config)
    for _ in range(20):
        controller.update(controller.batch_limit, 1000.0)  # far too slow: shrinks to the floor
    assert controller.batch_limit == 2
    for _ in range(20):
        controller.update(1, 1.0)  # fast, but the batch was smaller than the limit: no evidence to grow
    assert controller.batch_limit == 2
    for _ in range(20):
        controller.update(controller.batch_limit, 1.0)
    assert controller.batch_limit == 8


def _job(model="a", temperature=0.0, events=None, prompt=(1,)):
    sink = events if events is not None else []
    return Job(list(prompt), 4, Sampling(temperature), model, sink.append)


def test_batches_hold_one_group_oldest_first_up_to_the_limit():
    batcher = Batcher(lambda jobs: 1, BatchingConfig(max_batch=2, max_wait_ms=0))
    jobs = [_job("a"), _job("b"), _job("a"), _job("a", temperature=0.7), _job("a")]
    for job in jobs:
        batcher.submit(job)
    assert batcher.next_batch() == [jobs[0], jobs[2]]
    assert batcher.next_batch() == [jobs[1]]
    assert batcher.next_batch() == [jobs[3]]
    assert batcher.next_batch() == [jobs[4]]
    assert batcher.queue_depth() == 0


def test_cancelled_jobs_are_ended_not_run_and_a_full_queue_refuses():
    batcher = Batcher(lambda jobs: 1, BatchingConfig(max_batch=4, max_wait_ms=0, max_queue=2))
    events = []
    gone, kept = _job(events=events), _job()
    batcher.submit(gone)
    batcher.submit(kept)
    with pytest.raises(QueueFull):
        batcher.submit(_job())
    gone.cancelled.set()
    assert batcher.next_batch() == [kept]
    assert events == [("end", "cancelled")]


def test_jobs_whose_clients_left_hold_no_place_in_the_queue():
    metrics = ServeMetrics()
    batcher = Batcher(lambda jobs: 1, BatchingConfig(max_batch=4, max_wait_ms=0, max_queue=2), metrics)
    events = []
    gone = [_job(events=events), _job(events=events)]
    for job in gone:
        batcher.submit(job)
    for job in gone:
        job.cancelled.set()
    assert metrics.registry.get_sample_value("dsft_serve_queue_depth") == 2  # nothing has looked yet
    assert batcher.queue_depth() == 0 and events == [("end", "cancelled")] * 2
    assert metrics.registry.get_sample_value("dsft_serve_queue_depth") == 0
    live = [_job(), _job()]
    for job in live:
        batcher.submit(job)
    with pytest.raises(QueueFull):
        batcher.submit(_job())
    live[0].cancelled.set()
    batcher.submit(_job())  # the place of the client that left
    assert batcher.queue_depth() == 2


def test_a_failing_batch_answers_errors_and_the_worker_goes_on():
    calls = []

    def run_batch(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("boom")
        for job in jobs:
            job.deliver(("end", "stop"))
        return 1

    batcher = Batcher(run_batch, BatchingConfig(max_batch=1, max_wait_ms=0))
    first, second = [], []
    done = threading.Event()
    batcher.submit(_job(events=first))
    batcher.submit(Job([1], 4, Sampling(), "a", lambda event: (second.append(event), done.set())))
    batcher.start()
    assert done.wait(10)
    batcher.stop()
    assert first == [("error", "generation failed: RuntimeError")]
    assert second == [("end", "stop")]


def test_cache_is_least_recently_used_and_bounded():
    cache = ReplyCache(max_entries=2)
    keys = [ReplyCache.key("m", [i], 8, []) for i in range(3)]
    for i, key in enumerate(keys[:2]):
        cache.put(key, CachedReply(str(i), "stop", 1))
    assert cache.get(keys[0]).text == "0"  # 0 is now the most recent
    cache.put(keys[2], CachedReply("2", "stop", 1))
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and len(cache) == 2
    off = ReplyCache(max_entries=0)
    off.put(keys[0], CachedReply("0", "stop", 1))
    assert off.get(keys[0]) is None
    assert ReplyCache.key("m", [1], 8, []) != ReplyCache.key("m", [1], 9, [])


def test_canary_router_splits_by_percent_and_repeats_with_its_seed():
    canary = CanaryConfig(alias="prod", primary="v1", candidate="v2", percent=20, seed=7)
    router = Canary(canary)
    routes = [router.route() for _ in range(10_000)]
    assert abs(routes.count("v2") / len(routes) - 0.20) < 0.015
    again = Canary(canary)
    assert [again.route() for _ in range(10_000)] == routes
    never = Canary(canary.model_copy(update={"percent": 0}))
    always = Canary(canary.model_copy(update={"percent": 100}))
    assert {never.route() for _ in range(100)} == {"v1"} and {always.route() for _ in range(100)} == {"v2"}


class CharTokenizer:
    """Token i is chr(i); 0xFF00 + k are the two halves of a two-token character (decodes to U+FFFD alone)."""

    def decode(self, ids, skip_special_tokens=True):
        text, i = "", 0
        while i < len(ids):
            if ids[i] == 0xFF00:
                text += "é" if i + 1 < len(ids) and ids[i + 1] == 0xFF01 else "\ufffd"
                i += 2
                continue
            text += chr(ids[i])
            i += 1
        return text


def _feed(text: ReplyText, ids) -> list[str]:
    return [piece for piece in (text.add(i) for i in ids) if piece] + [text.finish()]


def test_reply_text_holds_back_incomplete_characters_and_possible_stop_strings():
    text = ReplyText(CharTokenizer(), stop=["END"])
    pieces = _feed(text, [ord("a"), 0xFF00, 0xFF01, ord("E"), ord("N"), ord("x")])
    assert "".join(pieces) == "aéENx" and text.text == "aéENx" and not text.stopped
    assert "\ufffd" not in "".join(pieces)
    stopped = ReplyText(CharTokenizer(), stop=["END", "!"])
    pieces = _feed(stopped, [ord(c) for c in "abEND more"])
    assert "".join(pieces) == "ab" and stopped.stopped
    assert _feed(ReplyText(CharTokenizer(), stop=[]), [ord(c) for c in "plain"]) == ["p", "l", "a", "i", "n", ""]
    ends_in_half = ReplyText(CharTokenizer(), stop=["!"])  # tokens that end a stop string and begin a character
    assert ends_in_half.extend([ord("a"), ord("!"), 0xFF00]) == "a" and ends_in_half.stopped
    assert ends_in_half.finish() == "" and ends_in_half.text == "a"


@pytest.mark.parametrize(("reply", "opens_thinking", "expected"), [
    ("<think>\nadd 5\n</think>\n\n42 m", False, ("add 5", "42 m")),
    ("<think>\nadd 5 and", False, ("add 5 and", "")),  # cut by max_tokens while thinking
    ("add 5\n</think>\n\n42 m", True, ("add 5", "42 m")),
    ("add 5\n</think>\n\n42 m", False, (None, "add 5\n</think>\n\n42 m")),  # a stream sent it as content
    ("<think>\n\n</think>\n\n42", False, ("", "42")),
    ("no close yet", True, ("no close yet", "")),
    ("", False, (None, "")),
])
def test_a_plain_reply_carries_the_fields_its_stream_carries(reply, opens_thinking, expected):
    assert split_reply(reply, opens_thinking) == expected
    for cut in (1, 2, 5):
        stream = ReasoningStream(opens_thinking)
        parts = [stream.feed(reply[i:i + cut]) for i in range(0, len(reply), cut)] + [stream.finish()]
        reasoning, answer = ("".join(part[i] for part in parts).rstrip() for i in (0, 1))
        assert (reasoning if stream.reasoned else None, answer) == expected


def test_a_temperature_too_small_to_sample_with_is_greedy():
    def sampling(extra: bytes) -> Sampling:
        return sampling_of(parse_request(b'{"model": "m", "prompt": "x"' + extra + b"}", CompletionRequest))

    assert sampling(b', "temperature": 1e-300, "top_p": 0.5') == Sampling() == sampling(b', "temperature": 0')
    assert sampling(b', "temperature": 0.5, "top_p": 0.5') == Sampling(0.5, 0.5)
    assert sampling(b"") == Sampling(1.0, 1.0)  # OpenAI's default temperature


def test_nullable_fields_take_their_defaults_and_an_empty_suffix_is_no_suffix():
    parsed = parse_request(b'{"model": "m", "prompt": "x", "n": null, "stream": null, "suffix": ""}', CompletionRequest)
    assert parsed.n is None and not parsed.stream


@pytest.mark.parametrize("cut", [1, 3, 9, 15])
def test_reasoning_stream_splits_like_the_whole_reply_wherever_pieces_break(cut):
    reply = "<think>\nadd 5\n</think>\n\n42 m"
    stream = ReasoningStream(prompt_opens_thinking=False)
    parts = [stream.feed(reply[i:i + cut]) for i in range(0, len(reply), cut)] + [stream.finish()]
    reasoning, answer = "".join(p[0] for p in parts), "".join(p[1] for p in parts)
    assert (reasoning.strip(), answer.strip()) == split_reply(reply, opens_thinking=False) == ("add 5", "42 m")
    opened = ReasoningStream(prompt_opens_thinking=True)
    parts = [opened.feed(p) for p in ("still thinking", " </thi", "nk>\n", "7")] + [opened.finish()]
    assert "".join(p[0] for p in parts) == "still thinking " and "".join(p[1] for p in parts) == "7"
    assert split_reply("no close yet", opens_thinking=True) == ("no close yet", "")


BAD_BODIES = [
    (b"{", None, "not valid JSON: EOF"),
    (b"[]", None, "an object"),
    (b'{"model": "m", "messages": []}', "messages", "at least 1"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', "max_tokens", "greater"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"}', "max_tokens", "integer"),
    (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "messages.0.content", "string"),
    (b'{"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}', "messages.0.role", "system"),
    (b'{"model": "m", "messages": "hi"}', "messages", "array"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "model", "required"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}', "temperature", "less"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream", "boolean"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}', "n", "less"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "functions": [{"x": 1}]}', "functions", "not supported"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"x": 1}]}', "tools.0.type", "required"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}', "tool_choice", "auto"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]}', "stop", "stop strings"),
]


@pytest.mark.parametrize(("body", "param", "words"), BAD_BODIES)
def test_bad_request_bodies_are_400_naming_the_field(body, param, words):
    with pytest.raises(ApiError) as caught:
        parse_request(body, ChatCompletionRequest)
    error = caught.value
    assert error.status == 400 and error.param == param and words in error.message
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_completion_requests_take_one_prompt_and_defaults_are_openai_s():
    parsed = parse_request(b'{"model": "m", "prompt": ["only one"], "stop": "x"}', CompletionRequest)
    assert parsed.prompt == "only one" and parsed.stop_strings() == ["x"] and parsed.temperature is None
    with pytest.raises(ApiError, match="exactly one prompt"):
        parse_request(b'{"model": "m", "prompt": ["a", "b"]}', CompletionRequest)
    chat = parse_request(b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},'
                         b' {"type": "text", "text": "b"}]}], "max_completion_tokens": 3, "max_tokens": 9, "x": 1}',
                         ChatCompletionRequest)
    assert chat.messages[0].text() == "ab" and chat.requested_max_tokens() == (3, "max_completion_tokens")


def test_serve_config_defaults_overrides_and_key_rules(tmp_path, monkeypatch):
    config = load_serve_config(None)
    assert (config.host, config.port, config.log_prompts, config.api_keys) == ("127.0.0.1", 8000, False, [])
    config = load_serve_config(None, ["serve.port=8001", "serve.batching.max_batch=16"])
    assert config.port == 8001 and config.batching.max_batch == 16
    monkeypatch.setenv("DSFT_TEST_KEY", "s3cret")
    path = tmp_path / "serve.yaml"
    path.write_text("serve:\n  api_keys: ['${DSFT_TEST_KEY}']\n  cache: {max_entries: 4}\n", encoding="utf-8")
    config = load_serve_config(path)
    assert config.api_keys[0].get_secret_value() == "s3cret" and "s3cret" not in repr(config)
    path.write_text("serve:\n  api_keys: [literal-key]\n", encoding="utf-8")
    with pytest.raises(DsftError, match=r"serve.api_keys.0 \(line 2\): write the key as a \$\{NAME\}"):
        load_serve_config(path)
    with pytest.raises(DsftError, match="serve.batching.speed: unknown key; allowed here: engine, min_batch"):
        load_serve_config(None, ["serve.batching.speed=1"])
    with pytest.raises(DsftError, match="min_batch"):
        load_serve_config(None, ["serve.batching.min_batch=9", "serve.batching.max_batch=4"])
    with pytest.raises(DsftError, match="served name"):
        load_serve_config(None, ["serve.adapters={'../x': /tmp/run}"])


def test_the_shipped_serve_example_validates(monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("DSFT_API_KEY", "example-key")
    config = load_serve_config(Path(__file__).parents[2] / "examples" / "serve" / "serve.yaml", ["serve.port=8001"])
    assert config.model_name == "quickstart" and config.port == 8001 and len(config.api_keys) == 1


def test_after_a_batch_the_worker_waits_for_its_clients_to_come_back():
    """A batch of 3 ended; one job waits. The worker waits (at most STRAGGLER_SHARE of that batch's 1 s) for the
    other two, which arrive 50 ms later, and takes all three; a lone job waits only max_wait_ms."""
    batcher = Batcher(lambda jobs: 1, BatchingConfig(max_batch=8, max_wait_ms=1))
    for _ in range(3):
        batcher.submit(_job())
    assert len(batcher.next_batch()) == 3
    batcher._last_end_s, batcher._last_batch_s = time.perf_counter(), 1.0
    batcher.submit(_job())
    threading.Timer(0.05, lambda: [batcher.submit(_job()) for _ in range(2)]).start()
    assert len(batcher.next_batch()) == 3
    lone = Batcher(lambda jobs: 1, BatchingConfig(max_batch=8, max_wait_ms=1))
    lone.submit(_job())
    started_s = time.perf_counter()
    assert len(lone.next_batch()) == 1 and time.perf_counter() - started_s < 0.05
