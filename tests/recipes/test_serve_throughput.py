"""benchmarks/serve_throughput.py on CPU, so the script a GPU session runs once (issue 9's 10x target, time to first
token and per-token latency at 1 and 64 clients) is known to work before the GPU is there."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the spawned client process imports it by name too
    import serve_throughput

    return serve_throughput


def run(script, monkeypatch, output: Path, *args: str) -> dict:
    monkeypatch.setattr(sys, "argv", ["serve_throughput.py", "--max-tokens", "6", "--baseline-requests", "2",
                                      "--min-requests", "3", "--requests-per-client", "1", "--output", str(output),
                                      *args])
    script.main()
    return json.loads(output.read_text(encoding="utf-8"))


def test_streamed_levels_record_first_token_and_per_token_latency(script, monkeypatch, tmp_path):
    report = run(script, monkeypatch, tmp_path / "tiny.json", "--shape", "tiny-deepseek-v3", "--clients", "1,3")
    assert report["baseline_loop"]["requests"] == 2 and report["baseline_loop"]["tokens_per_s"] > 0
    assert [level["clients"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["stream"] is True and level["requests"] == 3
        assert 0 < level["completion_tokens"] <= 3 * 6
        assert 0 < level["ttft_p50_ms"] <= level["latency_p50_ms"]
        assert 0 < level["per_token_p50_ms"] < level["latency_p95_ms"]
        assert level["batches"] >= 1 and level["speedup_vs_loop"] == round(
            level["tokens_per_s"] / report["baseline_loop"]["tokens_per_s"], 2)


def test_plain_requests_measure_throughput_without_client_side_token_times(script, monkeypatch, tmp_path):
    report = run(script, monkeypatch, tmp_path / "plain.json", "--shape", "tiny-qwen2", "--clients", "2", "--no-stream")
    (level,) = report["levels"]
    assert level["stream"] is False and level["requests"] == 3 and level["completion_tokens"] > 0
    assert level["ttft_p50_ms"] is None and level["per_token_p50_ms"] is None


def test_a_published_shape_streams_text_for_every_id_of_its_vocabulary(script, monkeypatch, tmp_path):
    from dsft.bench import suites

    # R1-Distill-Qwen's layout at toy width, with a vocabulary far beyond what the tokenizer trained here knows.
    small = {**suites.PUBLISHED_SHAPES["deepseek-r1-distill-qwen-1.5b"], "vocab_size": 5000, "hidden_size": 32,
             "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    monkeypatch.setitem(suites.PUBLISHED_SHAPES, "toy-qwen", small)
    model, tokenizer, _ = script.build("toy-qwen")
    assert len(tokenizer) == model.config.vocab_size == 5000
    assert tokenizer.decode([4999]).strip() == "t4999"
    report = run(script, monkeypatch, tmp_path / "toy.json", "--shape", "toy-qwen", "--clients", "1")
    (level,) = report["levels"]
    assert level["completion_tokens"] == 3 * 6  # random weights over 5,000 ids: no early end of sequence
    assert level["ttft_p50_ms"] is not None and level["per_token_p50_ms"] is not None


def test_read_event_keeps_first_and_last_text_times_and_the_usage(script):
    result = {"ttft_s": None, "last_token_s": None, "tokens": 0}
    lines = [": keep-alive", 'data: {"choices": [{"delta": {"role": "assistant"}}]}',
             'data: {"choices": [{"delta": {"reasoning_content": "hm"}}]}', "",
             'data: {"choices": [{"delta": {"content": "42"}}]}',
             'data: {"choices": [{"delta": {}, "finish_reason": "length"}]}',
             'data: {"choices": [], "usage": {"completion_tokens": 7}}', "data: [DONE]"]
    for elapsed_s, line in enumerate(lines):
        script.read_event(line, float(elapsed_s), result)
    assert result == {"ttft_s": 2.0, "last_token_s": 4.0, "tokens": 7}
    assert script.per_token_latencies_s([{**result, "latency_s": 8.0}]) == [(4.0 - 2.0) / 6]
    with pytest.raises(RuntimeError, match="failed a streamed request"):
        script.read_event('data: {"error": {"message": "boom"}}', 1.0, result)
