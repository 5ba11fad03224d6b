"""From files to training sequences: skipping and counting, truncation, validation split, eval prompts."""

import json

import pytest

from dsft.config import DataConfig
from dsft.data.dataset import (
    DataStats,
    build_sft_datasets,
    load_examples,
    split_prompt_reference,
    split_prompt_reference_optional,
)
from dsft.data.encode import IGNORE_INDEX, truncate
from dsft.data.formats import Example, Message
from dsft.errors import DsftError
from dsft.data.tokenizer import EOS


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _alpaca(count, start=0):
    return [{"instruction": f"say {i}", "output": f"{i}"} for i in range(start, start + count)]


def test_skip_counts_every_bad_record(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
        '{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}',
        '{"messages": [',
        "[1, 2]",
        '{"messages": []}',
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats = DataStats()
    examples = load_examples([str(path)], "auto", "skip", stats)
    assert [example.source for example in examples] == [f"{path}:1", f"{path}:6"]
    assert (stats.records_read, stats.skipped_bad) == (6, 4)
    assert stats.skip_reasons == [
        f"{path}:2: field 'messages[1].role': unknown role (not one of system, user, assistant, tool)",
        f"{path}:3: not valid JSON: Expecting value (column 15)",
        f"{path}:4: expected a JSON object, got list",
        f"{path}:5: field 'messages': empty conversation; expected at least one assistant message",
    ]


def test_on_error_stops_at_the_first_bad_record(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [*_alpaca(2), {"instruction": "q"}])
    with pytest.raises(DsftError, match=r"train\.jsonl:3: field 'output': required field is missing"):
        load_examples([path], "auto", "error", DataStats())


def test_malformed_json_line_stops_with_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DsftError, match=r"train\.jsonl:3: not valid JSON"):
        load_examples([str(path)], "text", "error", DataStats())


def test_missing_file_is_never_skipped(tmp_path):
    with pytest.raises(DsftError, match="data file not found"):
        load_examples([str(tmp_path / "nope.jsonl")], "auto", "skip", DataStats())


def test_skip_reasons_are_capped_but_all_counted(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [*_alpaca(1), *[{"instruction": "q"}] * 25])
    stats = DataStats()
    load_examples([path], "auto", "skip", stats)
    assert (stats.skipped_bad, len(stats.skip_reasons)) == (25, 20)
    assert stats.lines()[21] == "  ... and 5 more skipped"


def test_auto_format_per_file_max_samples_and_system_prompt(tmp_path):
    alpaca = _write_jsonl(tmp_path / "a.jsonl", _alpaca(2))
    text = _write_jsonl(tmp_path / "b.jsonl", [{"text": "doc one"}, {"text": "doc two"}])
    examples = load_examples([alpaca, text], "auto", "error", DataStats(), system_prompt="sys", max_samples=3)
    system = Message("system", "sys")
    assert examples == [
        Example(f"{alpaca}:1", messages=(system, Message("user", "say 0"), Message("assistant", "0"))),
        Example(f"{alpaca}:2", messages=(system, Message("user", "say 1"), Message("assistant", "1"))),
        Example(f"{text}:1", text="doc one"),
    ]


def test_build_sft_datasets_rows_and_stats(tmp_path, tokenizer):
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"instruction": "what is 6*7?", "output": "42"}])
    text = _write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}])
    train, validation, stats = build_sft_datasets(DataConfig(train_files=[chat, text]), tokenizer, seed=0)
    assert validation == []
    labelled = [token for token, label in zip(train[0]["input_ids"], train[0]["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == f"42{EOS}"
    assert train[1]["labels"] == train[1]["input_ids"]
    assert stats.train_tokens == len(train[0]["input_ids"]) + len(train[1]["input_ids"])
    assert stats.trainable_tokens == len(labelled) + len(train[1]["input_ids"])
    assert (stats.records_read, stats.train_examples, stats.validation_examples) == (2, 2, 0)
    share = stats.trainable_tokens / stats.train_tokens
    assert stats.lines() == [
        "records read: 2, skipped as bad: 0",
        "examples: 2 train, 0 validation",
        "over max_length_tokens: 0 truncated, 0 dropped; dropped with no trainable token left: 0",
        f"train tokens: {stats.train_tokens}, trainable: {stats.trainable_tokens} ({share:.1%})",
    ]


def test_truncation_right_drop_and_no_target(tmp_path, tokenizer):
    rows = [
        {"instruction": "say 1", "output": "1"},
        {"instruction": "say 2", "output": "2 " * 20},
        {"instruction": "what is the answer to the question " * 3, "output": "x"},
    ]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    short_ids = build_sft_datasets(DataConfig(train_files=[path], max_samples=1), tokenizer, seed=0)[0][0]["input_ids"]
    max_length_tokens = len(short_ids) + 4

    config = DataConfig(train_files=[path], max_length_tokens=max_length_tokens, truncation="right")
    train, _, stats = build_sft_datasets(config, tokenizer, seed=0)
    assert [len(row["input_ids"]) for row in train] == [len(short_ids), max_length_tokens]
    assert (stats.truncated, stats.dropped_too_long, stats.dropped_no_target) == (1, 0, 1)

    config = DataConfig(train_files=[path], max_length_tokens=max_length_tokens, truncation="drop")
    train, _, stats = build_sft_datasets(config, tokenizer, seed=0)
    assert [row["input_ids"] for row in train] == [short_ids]
    assert (stats.truncated, stats.dropped_too_long, stats.dropped_no_target) == (0, 2, 0)


def test_truncate():
    ids, labels = [1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4]
    assert truncate(ids, labels, 4, "drop") == (ids, labels)
    assert truncate(ids, labels, 3, "right") == ([1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 3])
    assert truncate(ids, labels, 3, "drop") is None
    assert truncate(ids, labels, 2, "right") is None
    with pytest.raises(ValueError, match="unknown truncation policy 'left'"):
        truncate(ids, labels, 2, "left")


def test_nothing_left_to_train_on(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "train.jsonl", [{"instruction": "what is the answer " * 5, "output": "x"}])
    with pytest.raises(DsftError) as info:
        build_sft_datasets(DataConfig(train_files=[path], max_length_tokens=8), tokenizer, seed=0)
    assert str(info.value).startswith("no training examples left from data.train_files:\n  records read: 1")
    assert "dropped with no trainable token left: 1" in str(info.value)


def test_validation_ratio_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "train.jsonl", _alpaca(20))
    everything, _, _ = build_sft_datasets(DataConfig(train_files=[path]), tokenizer, seed=0)
    config = DataConfig(train_files=[path], validation_ratio=0.25)
    train, validation, stats = build_sft_datasets(config, tokenizer, seed=3)
    again, again_validation, _ = build_sft_datasets(config, tokenizer, seed=3)
    other_train, _, _ = build_sft_datasets(config, tokenizer, seed=4)
    assert (len(train), len(validation)) == (15, 5)
    assert (stats.train_examples, stats.validation_examples) == (15, 5)
    assert (again, again_validation) == (train, validation)
    assert other_train != train
    train_ids = [row["input_ids"] for row in train]
    validation_ids = [row["input_ids"] for row in validation]
    assert not set(map(tuple, train_ids)) & set(map(tuple, validation_ids))
    # Both halves keep file order.
    everything_ids = [row["input_ids"] for row in everything]
    assert train_ids == [ids for ids in everything_ids if ids in train_ids]
    assert sorted(train_ids + validation_ids) == sorted(everything_ids)


def test_validation_files(tmp_path, tokenizer):
    train_path = _write_jsonl(tmp_path / "train.jsonl", _alpaca(3))
    validation_path = _write_jsonl(tmp_path / "validation.jsonl", _alpaca(2, start=3))
    config = DataConfig(train_files=[train_path], validation_files=[validation_path], max_samples=2)
    train, validation, stats = build_sft_datasets(config, tokenizer, seed=0)
    assert (len(train), len(validation), stats.records_read) == (2, 2, 4)


def test_render_errors_name_the_record(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('no') }}")
    path = _write_jsonl(tmp_path / "train.jsonl", _alpaca(1))
    with pytest.raises(DsftError, match=r"train\.jsonl:1: the tokenizer's chat template failed"):
        build_sft_datasets(DataConfig(train_files=[path], chat_template="tokenizer"), tokenizer, seed=0)


def test_split_prompt_reference():
    messages = (Message("user", "q"), Message("assistant", "a", reasoning="r"))
    assert split_prompt_reference(Example("f:1", messages=messages)) == ((Message("user", "q"),), "a")
    with pytest.raises(DsftError, match="f:2: a text record has no prompt and reference answer"):
        split_prompt_reference(Example("f:2", text="doc"))


def test_load_prompt_only_examples(tmp_path):
    rows = [{"instruction": "say 1"}, {"instruction": "say 2", "output": "2"}]
    path = _write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(DsftError, match=r"test\.jsonl:1: field 'output': required field is missing"):
        load_examples([path], "auto", "error", DataStats())
    examples = load_examples([path], "auto", "error", DataStats(), require_answer=False)
    assert [example.messages for example in examples] == [
        (Message("user", "say 1"),),
        (Message("user", "say 2"), Message("assistant", "2")),
    ]


def test_split_prompt_reference_optional():
    prompt = (Message("system", "s"), Message("user", "q"))
    assert split_prompt_reference_optional(Example("f:1", messages=prompt)) == (prompt, None)
    answered = (*prompt, Message("assistant", "a", reasoning="r"))
    assert split_prompt_reference_optional(Example("f:1", messages=answered)) == (prompt, "a")
    with pytest.raises(DsftError, match="f:2: a text record has no prompt and reference answer"):
        split_prompt_reference_optional(Example("f:2", text="doc"))


def test_tool_records_train_the_calls_and_answers_never_the_results(tmp_path, tokenizer):
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    record = {"tools": json.dumps([weather]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "RESULT 18 C"},
        {"from": "gpt", "value": "It is 18 C."}]}
    path = _write_jsonl(tmp_path / "tools.jsonl", [record])
    config = DataConfig(train_files=[str(path)], chat_template="deepseek_v31")
    (row,), _, stats = build_sft_datasets(config, tokenizer, seed=0)
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])
    prompt = tokenizer.decode(row["input_ids"])
    assert "## Tools" in prompt and "### get_weather" in prompt  # the declared tool, in the system prompt
    assert trained == ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}'
                       f"<｜tool▁call▁end｜><｜tool▁calls▁end｜>{EOS}It is 18 C.{EOS}")
    assert "RESULT 18 C" in prompt and "RESULT" not in trained and stats.train_examples == 1
