"""dsft data inspect names the layout of a file and what dsft does with it, and counts its valid records by the
rules of that layout."""

import json

import pytest
from rich.console import Console

from dsft.data.inspect import LAYOUTS, inspect_file

USER, ANSWER = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
WEATHER = {"type": "function", "function": {"name": "get_weather"}}
CASES = {
    "sft": [{"messages": [USER, ANSWER]}, {"messages": [{"role": "system", "content": "s"}, USER, ANSWER]}],
    "preference pairs": [{"instruction": "q", "chosen": "a", "rejected": "b"},
                         {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
                          "rejected": {"from": "gpt", "value": "b"}}],
    "unpaired preference": [{"messages": [USER, ANSWER], "label": True}, {"messages": [USER, ANSWER], "label": False}],
    "tool calling": [{"tools": [WEATHER], "messages": [USER, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}]}],
    "images": [{"messages": [USER, ANSWER], "images": ["cat.png"]}],
    "text": [{"text": "a document"}],
}


@pytest.mark.parametrize("layout", CASES)
def test_each_layout_is_named_with_what_dsft_does(tmp_path, layout):
    path = tmp_path / "data.jsonl"
    bad = {"messages": []} if layout == "sft" else {}  # an empty conversation: counted bad
    records = [*CASES[layout], *([bad] if bad else [])]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    summary = inspect_file(str(path), console=Console(quiet=True))
    assert (summary["layout"], summary["dsft_does"]) == (layout, LAYOUTS[layout])
    expected_valid = 0 if layout == "images" else len(CASES[layout])
    assert summary["valid"] == expected_valid and summary["records"] == (len(records) if layout != "images" else 0)


def test_a_field_map_reads_a_file_in_its_own_names(tmp_path):
    from dsft.config.columns import TagsConfig
    from dsft.data.columns import FieldMap

    path = tmp_path / "own.jsonl"
    path.write_text(json.dumps({"dialog": [{"who": "client", "said": "q"}, {"who": "agent", "said": "a"}],
                                "good": True}) + "\n", encoding="utf-8")
    fields = FieldMap({"messages": "dialog", "label": "good"},
                      TagsConfig(role_tag="who", content_tag="said", user_tag="client", assistant_tag="agent"))
    summary = inspect_file(str(path), console=Console(quiet=True), fields=fields)
    assert (summary["layout"], summary["valid"], summary["bad"]) == ("unpaired preference", 1, 0)
    assert summary["keys"] == {"messages": 1, "label": 1}
