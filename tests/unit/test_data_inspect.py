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
