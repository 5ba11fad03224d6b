"""DeepSeek-V3.1/V3.2 hybrid thinking (data.chat_template: deepseek_v31) through the real CLI: training renders each
record in its mode (auto: thinking when it reasons; a record's own thinking field; reasoning refused in
non-thinking mode unless data.reasoning: drop), and the run's data.thinking reaches dsft generate (and its
--thinking), dsft eval and dsft serve (and a request's chat_template_kwargs.thinking). The prompts are read where
each tool puts them: the ids dsft generate decodes from, eval's results.json, serve's prompt log."""

import json
import logging

import pytest
from openai import OpenAI
from typer.testing import CliRunner

from dsft.cli import app
from dsft.config.serve import load_serve_config
from dsft.data.chat import render_prompt
from dsft.data.formats import Message
from dsft.data.tokenizer import ASSISTANT, THINK_CLOSE, THINK_OPEN, load_tokenizer
from dsft.errors import DsftError
from dsft.serve import chat as serve_chat
from dsft.serve.models import load_served
from dsft.serve.server import create_app, serve_in_thread

from .conftest import make_config

THINKING_PROMPT, PLAIN_PROMPT = ASSISTANT + THINK_OPEN, ASSISTANT + THINK_CLOSE


def chat_records(count: int) -> list[dict]:
    records = []
    for i in range(count):
        question = {"role": "user", "content": f"Convert {i + 2} km to m."}
        answer = {"role": "assistant", "content": f"{(i + 2) * 1000} m"}
        if i % 3 == 0:
            answer["reasoning"] = f"{i + 2} times 1000"  # trains in thinking mode (auto)
        records.append({"messages": [question, answer], **({"thinking": False} if i % 3 == 1 else {})})
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("thinking")
    files = {"train": root / "train.jsonl", "test": root / "test.jsonl"}
    for name, count in (("train", 24), ("test", 3)):
        files[name].write_text("".join(json.dumps(r) + "\n" for r in chat_records(count)), encoding="utf-8")
    return files


def train(tmp_path, data, **values):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = make_config(tmp_path, {"train": data["train"]}, data={"chat_template": "deepseek_v31", **values},
                         train={"max_steps": 2})
    return CliRunner().invoke(app, ["train", str(config)]), tmp_path / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data) -> dict:
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for mode in ("auto", "on"):
        result, runs[mode] = train(root / mode, data, thinking=mode)
        assert result.exit_code == 0, result.output
    return runs


def test_reasoning_in_non_thinking_mode_is_refused_by_record_unless_dropped(tmp_path, data):
    result, _ = train(tmp_path / "off", data, thinking="off")
    assert result.exit_code == 1 and isinstance(result.exception, DsftError)
    message = str(result.exception)
    assert message.startswith(f"{data['train']}:1: ") and "data.reasoning: drop" in message
    result, run = train(tmp_path / "drop", data, thinking="off", reasoning="drop")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["data"]["train_examples"] == 24


def test_the_saved_tokenizer_renders_both_modes_as_training_did(runs):
    tokenizer = load_tokenizer(runs["auto"])
    history = [Message("user", "Convert 3 km to m.")]
    for thinking in (False, True):
        text = tokenizer.apply_chat_template([{"role": "user", "content": history[0].content}], tokenize=False,
                                             add_generation_prompt=True, thinking=thinking)
        assert text == "".join(s.text for s in render_prompt(history, "deepseek_v31", tokenizer, thinking))
        assert text.endswith(THINKING_PROMPT if thinking else PLAIN_PROMPT)


def test_generate_takes_the_runs_thinking_or_its_option(runs, monkeypatch):
    prompts = []

    def spy(model, tokenizer, ids, settings, *args):
        prompts.append(tokenizer.decode(ids[0]))
        return ["x"]

    monkeypatch.setattr(serve_chat, "generate_batch", spy)
    for run, option, expected in ((runs["auto"], [], PLAIN_PROMPT), (runs["on"], [], THINKING_PROMPT),
                                  (runs["auto"], ["--thinking", "on"], THINKING_PROMPT),
                                  (runs["on"], ["--thinking", "off"], PLAIN_PROMPT)):
        result = CliRunner().invoke(app, ["generate", str(run), "--prompt", "Convert 3 km to m.", *option])
        assert result.exit_code == 0, result.output
        assert prompts[-1].endswith(expected), (option, prompts[-1])
    result = CliRunner().invoke(app, ["generate", str(runs["on"]), "--prompt", "q", "--thinking", "maybe"])
    assert result.exit_code == 1 and "--thinking: 'maybe' is not one of auto, on, off" in str(result.exception)


@pytest.mark.parametrize("mode, expected", [("auto", PLAIN_PROMPT), ("on", THINKING_PROMPT)])
def test_eval_prompts_in_the_runs_thinking_mode(runs, data, tmp_path, mode, expected):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", str(runs[mode]), "--data", str(data["test"]), "--out", str(out),
                                      "--set", "eval.max_new_tokens=2"])
    assert result.exit_code == 0, result.output
    examples = json.loads((out / "results.json").read_text(encoding="utf-8"))["examples"]
    assert examples and all(row["rendered_prompt"]["target"].endswith(expected) for row in examples)


def test_serve_takes_the_runs_thinking_or_the_requests(runs, caplog):
    caplog.set_level(logging.INFO)
    config = load_serve_config(None, ["serve.model_name=v31", "serve.log_prompts=true"])
    with serve_in_thread(create_app(load_served(str(runs["auto"]), config), config)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for extra, expected in (({}, PLAIN_PROMPT), ({"chat_template_kwargs": {"thinking": True}}, THINKING_PROMPT),
                                ({"chat_template_kwargs": {"thinking": False}}, PLAIN_PROMPT)):
            caplog.clear()
            reply = client.chat.completions.create(model="v31", messages=[{"role": "user", "content": "hi"}],
                                                   temperature=0, max_tokens=3, extra_body=extra)
            logged = next(json.loads(r.getMessage().split(" prompt=", 1)[1].split(" reply=")[0])
                          for r in caplog.records if " prompt=" in r.getMessage())
            assert logged.endswith(expected), extra
            assert reply.choices[0].finish_reason in ("stop", "length")
        bad = client.chat.completions.with_raw_response
        with pytest.raises(Exception, match="chat_template_kwargs"):
            bad.create(model="v31", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                       extra_body={"chat_template_kwargs": {"enable_thinking": True}})
