"""data.columns and data.tags: a dataset with its own field names reads as the same examples as one in dsft's names,
its errors name the file's fields, clashes are refused, and the records (and files) are never changed."""

import json

import pytest
from pydantic import ValidationError

from dsft.config import DataConfig, RunConfig
from dsft.config.columns import TagsConfig
from dsft.data.columns import FieldMap
from dsft.data.dataset import DataStats, load_examples, load_splits
from dsft.data.formats import to_example
from dsft.data.kto_data import to_labelled
from dsft.data.preference import to_pair
from dsft.data.read import RawRecord
from dsft.errors import DsftError

SOURCE = "data/own.jsonl:3"
LF_TAGS = TagsConfig(role_tag="speaker", content_tag="text", user_tag="patient", assistant_tag="doctor",
                     system_tag="context", observation_tag="lookup", function_tag="query")


def _record(data: dict) -> RawRecord:
    return RawRecord(data, SOURCE)


def test_alpaca_fields_named_otherwise_read_as_the_same_example():
    fields = FieldMap({"instruction": "question", "output": "answer", "system": "persona"})
    own = {"question": "2+2?", "answer": "4", "persona": "Be brief.", "input": "ctx"}
    ours = {"instruction": "2+2?", "output": "4", "system": "Be brief.", "input": "ctx"}
    assert to_example(fields.apply(_record(own)), "alpaca") == to_example(_record(ours), "alpaca")


def test_sharegpt_tags_rename_turn_keys_and_roles_like_llama_factory():
    fields = FieldMap({"conversations": "dialog"}, LF_TAGS)
    own = {"dialog": [{"speaker": "context", "text": "You are a nurse."}, {"speaker": "patient", "text": "Fever?"},
                      {"speaker": "query", "text": json.dumps({"name": "thermo", "arguments": {}})},
                      {"speaker": "lookup", "text": "39 C"}, {"speaker": "doctor", "text": "Yes, 39 C."}],
           "tools": json.dumps([{"name": "thermo", "parameters": {"type": "object", "properties": {}}}])}
    ours = {"conversations": [{"from": "system", "value": "You are a nurse."}, {"from": "human", "value": "Fever?"},
                              {"from": "function_call", "value": json.dumps({"name": "thermo", "arguments": {}})},
                              {"from": "observation", "value": "39 C"}, {"from": "gpt", "value": "Yes, 39 C."}],
            "tools": own["tools"]}
    assert to_example(fields.apply(_record(own)), "sharegpt") == to_example(_record(ours), "sharegpt")


def test_in_messages_lists_the_observation_tag_reads_as_the_tool_role():
    fields = FieldMap(tags=TagsConfig(role_tag="speaker", observation_tag="lookup"))
    renamed = fields.apply(_record({"messages": [{"speaker": "user", "content": "a"}, {"speaker": "lookup"}]}))
    assert renamed.data == {"messages": [{"role": "user", "content": "a"}, {"role": "tool"}]}


def test_preference_and_kto_fields_named_otherwise():
    fields = FieldMap({"instruction": "q", "chosen": "good", "rejected": "bad"})
    pair = to_pair(fields.apply(_record({"q": "Hi?", "good": "Hello.", "bad": "Go away."})))
    assert pair == to_pair(_record({"instruction": "Hi?", "chosen": "Hello.", "rejected": "Go away."}))
    kto = FieldMap({"label": "kto_tag"}, TagsConfig(role_tag="from", content_tag="value"))
    own = {"messages": [{"from": "user", "value": "Hi?"}, {"from": "assistant", "value": "Hello."}], "kto_tag": True}
    ours = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}], "label": True}
    assert to_labelled(kto.apply(_record(own))) == to_labelled(_record(ours))


def test_swapped_names_and_the_record_left_unchanged():
    data = {"instruction": "x", "input": "the answer", "output": "the context"}
    before = json.dumps(data)
    renamed = FieldMap({"input": "output", "output": "input"}).apply(_record(data))
    assert renamed.data == {"instruction": "x", "input": "the context", "output": "the answer"}
    assert json.dumps(data) == before


def test_errors_name_the_files_own_fields():
    fields = FieldMap({"conversations": "dialog"}, LF_TAGS)
    record = fields.apply(_record({"dialog": [{"speaker": "patient", "text": "Fever?"}, {"speaker": "doctor"}]}))
    with pytest.raises(DsftError) as info:
        to_example(record, "sharegpt")
    explained = fields.explain(info.value)
    assert str(explained) == ("data/own.jsonl:3: field 'dialog[1].text' (read as 'conversations[1].value' through "
                              "data.columns / data.tags): required field is missing")
    untouched = DsftError("data/own.jsonl:3: field 'tools': not valid JSON")
    assert fields.explain(untouched) is untouched


def test_a_record_holding_both_names_of_a_field_is_refused():
    with pytest.raises(DsftError, match=r"fields 'answer' and 'output' are both present"):
        FieldMap({"output": "answer"}).apply(_record({"instruction": "a", "answer": "b", "output": "c"}))
    with pytest.raises(DsftError, match=r"field 'dialog\[0\]': keys 'text' and 'value' are both present"):
        FieldMap({"conversations": "dialog"}, TagsConfig(content_tag="text")).apply(
            _record({"dialog": [{"from": "human", "text": "a", "value": "b"}]}))


def test_the_config_refuses_unknown_fields_clashes_and_empty_names():
    with pytest.raises(ValidationError, match="columns.answer"):
        DataConfig(train_files=["t.jsonl"], columns={"answer": "output"})
    with pytest.raises(ValidationError, match="reply is given for instruction and output"):
        DataConfig(train_files=["t.jsonl"], columns={"instruction": "reply", "output": "reply"})
    with pytest.raises(ValidationError, match="must not be empty"):
        TagsConfig(user_tag="")
    with pytest.raises(ValidationError, match="response is LLaMA-Factory's name; dsft reads it as output: write "
                                              "output: answer"):
        DataConfig(train_files=["t.jsonl"], columns={"response": "answer"})
    with pytest.raises(ValidationError, match="images: dsft trains text models only"):
        DataConfig(train_files=["t.jsonl"], columns={"images": "pictures"})


def test_head_tasks_name_their_own_fields():
    with pytest.raises(ValidationError, match="task classification names the fields it reads in its classify section"):
        RunConfig(model={"preset": "tiny-qwen2"}, task="classification",
                  data={"train_files": ["t.jsonl"], "columns": {"text": "body"}})


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_loaders_rename_skip_with_explained_errors_and_split(tmp_path):
    good = {"q": "2+2?", "a": "4"}
    path = _write(tmp_path / "own.jsonl", [good, {"q": "no answer"}, good])
    data = DataConfig(train_files=[path], columns={"instruction": "q", "output": "a"}, on_error="skip")
    stats = DataStats()
    examples = load_examples(data.train_files, "auto", "skip", stats, fields=FieldMap.of(data))
    assert [e.messages[-1].content for e in examples] == ["4", "4"]
    assert stats.skip_reasons == [f"{path}:2: field 'a' (read as 'output' through data.columns / data.tags): "
                                  "required field is missing"]
    with pytest.raises(DsftError, match="cannot tell the data format"):
        load_examples(data.train_files, "auto", "error", DataStats())  # without the map: no known layout
    train, validation = load_splits(data, lambda record: record.data["instruction"], DataStats(), seed=0)
    assert (train, validation) == (["2+2?", "no answer", "2+2?"], [])
