"""Tool calling end to end on a tiny model: `dsft train` on LLaMA-Factory's and OpenAI's tool layouts (the same
conversation), then `dsft serve` answered through the official openai client's tools API: the call, streamed and
not, parsed into tool_calls; the tool's result sent back and answered; tool_choice none and a named function.

The model learns one weather conversation by heart (80 steps), so its greedy reply is the call it was taught."""

import json

import pytest
from openai import OpenAI
from typer.testing import CliRunner

from dsft.cli import app
from dsft.config.serve import load_serve_config
from dsft.serve.models import load_served
from dsft.serve.server import create_app, serve_in_thread

from .conftest import make_config

WEATHER = {"name": "get_weather", "description": "Weather of a city today.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}]
ASK = {"role": "user", "content": "Weather in Paris?"}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}
ANSWER = "It is 18 C and sunny in Paris."
OPENAI_RECORD = {"tools": TOOLS, "messages": [ASK, CALL, RESULT, {"role": "assistant", "content": ANSWER}]}
LLAMA_FACTORY_RECORD = {"tools": json.dumps([WEATHER]), "conversations": [
    {"from": "human", "value": ASK["content"]},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": RESULT["content"]}, {"from": "gpt", "value": ANSWER}]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    files = {"openai": root / "openai.jsonl", "llama_factory": root / "llama_factory.jsonl"}
    files["openai"].write_text(json.dumps(OPENAI_RECORD) + "\n", encoding="utf-8")
    files["llama_factory"].write_text("".join(json.dumps(LLAMA_FACTORY_RECORD) + "\n" for _ in range(15)),
                                      encoding="utf-8")
    config = make_config(root, {"train": files["openai"]},
                         data={"train_files": [str(f) for f in files.values()], "chat_template": "deepseek_v31",
                               "max_length_tokens": 512},
                         method={"type": "full"}, train={"max_steps": 80, "learning_rate": 3e-3})
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    summary = json.loads((root / "run" / "summary.json").read_text(encoding="utf-8"))
    assert summary["data"]["train_examples"] == 16  # both layouts read, nothing skipped
    return root / "run"


@pytest.fixture(scope="module")
def client(run):
    config = load_serve_config(None, ["serve.model_name=tools"])
    with serve_in_thread(create_app(load_served(str(run), config), config)) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def ask(client, messages, **extra):
    return client.chat.completions.create(model="tools", messages=messages, tools=TOOLS, temperature=0,
                                          max_tokens=48, **extra)


def test_the_reply_is_the_call_parsed_into_tool_calls(client):
    choice = ask(client, [ASK]).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_a_streamed_call_arrives_as_tool_call_deltas(client):
    chunks = list(ask(client, [ASK], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0].tool_calls[0].index == 0
    assert deltas[0].tool_calls[0].function.name == "get_weather"
    assert json.loads(deltas[0].tool_calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # no call text as content


def test_the_result_sent_back_is_answered(client):
    first = ask(client, [ASK]).choices[0].message
    history = [ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump() for call in first.tool_calls]},
               {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": RESULT["content"]}]
    choice = ask(client, history).choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert choice.message.content == ANSWER


def test_tool_choice_none_offers_no_tools_and_a_named_function_is_called(client):
    plain = ask(client, [ASK], tool_choice="none").choices[0]
    assert plain.message.tool_calls is None and plain.finish_reason in ("stop", "length")
    named = ask(client, [ASK], tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    assert named.finish_reason == "tool_calls" and named.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(named.message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_eval_reports_the_tool_call_metrics(run, tmp_path):
    test_file = tmp_path / "test.jsonl"
    call_only = {"tools": TOOLS, "messages": [ASK, CALL]}  # the reference answer is the call
    answered = {"tools": TOOLS, "messages": [ASK, CALL, RESULT, {"role": "assistant", "content": ANSWER}]}
    test_file.write_text(json.dumps(call_only) + "\n" + json.dumps(answered) + "\n", encoding="utf-8")
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", str(run), "--data", str(test_file), "--out", str(out),
                                      "--set", "eval.max_new_tokens=48"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "results.json").read_text(encoding="utf-8"))["models"]["target"]["metrics"]
    assert {k: metrics[k] for k in metrics if k.startswith("tool_")} == {
        "tool_call_rate": 1.0, "tool_name_exact": 1.0, "tool_arguments_exact": 1.0, "tool_arguments_valid_json": 1.0,
        "tool_false_call_rate": 0.0}
    assert "tool_call_rate" in (out / "report.md").read_text(encoding="utf-8")
