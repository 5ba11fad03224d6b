"""Preference pairs: both record shapes, and errors that name the record and field."""

import pytest

from dsft.data.formats import Message
from dsft.data.preference import to_pair
from dsft.data.read import RawRecord
from dsft.errors import DsftError


def pair(data):
    return to_pair(RawRecord(data, "prefs.jsonl:3"))


def test_alpaca_style_pair_with_input_and_inline_reasoning():
    p = pair({"instruction": "2+2?", "input": "be brief", "chosen": "<think>add</think>4", "rejected": "5"})
    assert p.prompt == (Message("user", "2+2?\n\nbe brief"),)
    assert p.chosen == Message("assistant", "4", "add") and p.rejected == Message("assistant", "5")
    assert pair({"prompt": "hi", "chosen": "a", "rejected": "b"}).prompt == (Message("user", "hi"),)


def test_messages_style_with_explicit_and_implicit_prompt_agree():
    system, user = {"role": "system", "content": "s"}, {"role": "user", "content": "q"}
    explicit = pair({"prompt": [system, user], "chosen": [{"role": "assistant", "content": "good"}],
                     "rejected": [{"role": "assistant", "content": "bad"}]})
    implicit = pair({"chosen": [system, user, {"role": "assistant", "content": "good"}],
                     "rejected": [system, user, {"role": "assistant", "content": "bad"}]})
    assert explicit == implicit
    assert explicit.prompt == (Message("system", "s"), Message("user", "q"))


def test_llama_factorys_layout_reads_as_the_same_pair():
    # LLaMA-Factory's dpo_en_demo: the prompt in sharegpt conversations, each answer one message object.
    sharegpt = pair({"system": "s", "conversations": [{"from": "human", "value": "q"}],
                     "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}})
    messages = pair({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                     "chosen": {"role": "assistant", "content": "good"},
                     "rejected": {"role": "assistant", "content": "bad"}})
    assert sharegpt == messages
    assert sharegpt.prompt == (Message("system", "s"), Message("user", "q"))
    assert (sharegpt.chosen.content, sharegpt.rejected.content) == ("good", "bad")


@pytest.mark.parametrize("data, message", [
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "bot", "value": "b"}}, "prefs.jsonl:3: field 'rejected.from': unknown role"),
    ({"chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
     "field 'conversations' (or 'messages') must hold the prompt conversation"),
    ({"instruction": "q", "chosen": "a"}, "prefs.jsonl:3: field 'rejected' is missing"),
    ({"instruction": "q", "chosen": "a", "rejected": ["b"]}, "must both be strings, both message lists or both message objects"),
    ({"chosen": "a", "rejected": "b"}, "prefs.jsonl:3: field 'instruction' (or 'prompt') is missing"),
    ({"instruction": "q", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are the same answer"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "differ at turn 0 before their final answer"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "robot", "content": "b"}]}, "prefs.jsonl:3: field 'rejected[0].role': unknown role"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "b"}]}, "prefs.jsonl:3: field 'rejected': no assistant message"),
])
def test_bad_pairs_name_the_record_and_field(data, message):
    with pytest.raises(DsftError) as error:
        pair(data)
    assert message in str(error.value)
