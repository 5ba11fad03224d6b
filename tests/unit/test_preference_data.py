"""Preference files to token ids: prompts encode as generation encodes them, answers as SFT trains them; pairs are
fitted to the token budget and every drop is counted; bad records are skipped and counted or stop with file:line."""

import json

import pytest

from dsft.config import DataConfig
from dsft.data.chat import render_conversation
from dsft.data.dataset import DataStats
from dsft.data.encode import IGNORE_INDEX, encode_segments
from dsft.data.formats import Message
from dsft.data.preference import PreferencePair
from dsft.data.preference_data import (
    EncodedPair,
    build_preference_datasets,
    encode_pair,
    fit_pair,
    full_sequences,
    load_pairs,
)
from dsft.errors import DsftError
from dsft.models.generate import prompt_ids

PROMPT = (Message("system", "be exact"), Message("user", "what is 74 + 2?"))


@pytest.mark.parametrize("template", ["deepseek_v3", "deepseek_r1"])
def test_prompt_encodes_as_generation_and_answers_as_sft(tokenizer, template):
    pair = PreferencePair("p.jsonl:1", PROMPT, Message("assistant", "76", "add 2"), Message("assistant", "the answer"))
    encoded = encode_pair(pair, template, tokenizer)
    assert encoded.prompt_ids == prompt_ids(PROMPT, template, tokenizer)
    for answer, answer_ids in ((pair.chosen, encoded.chosen_ids), (pair.rejected, encoded.rejected_ids)):
        ids, labels = encode_segments(render_conversation([*PROMPT, answer], template, tokenizer, "final_assistant"), tokenizer)
        assert ids == encoded.prompt_ids + answer_ids
        assert [i for i, label in zip(ids, labels) if label != IGNORE_INDEX] == answer_ids
    assert encoded.chosen_ids[-1] == tokenizer.eos_token_id
    assert full_sequences(encoded.as_row())["chosen_ids"] == encoded.prompt_ids + encoded.chosen_ids


def test_a_v31_pair_shares_one_prompt_in_the_mode_of_its_reasoning_answer(tokenizer):
    # auto: the chosen answer reasons, so both answers train after V3.1's thinking prompt; the rejected one closes
    # an empty think block, as the model would write it.
    pair = PreferencePair("p.jsonl:1", PROMPT, Message("assistant", "76", "add 2"), Message("assistant", "the answer"))
    encoded = encode_pair(pair, "deepseek_v31", tokenizer)
    assert encoded.prompt_ids == prompt_ids(PROMPT, "deepseek_v31", tokenizer, thinking=True)
    assert tokenizer.decode(encoded.rejected_ids) == "</think>the answer<｜end▁of▁sentence｜>"
    assert tokenizer.decode(encoded.chosen_ids) == "add 2</think>76<｜end▁of▁sentence｜>"
    with pytest.raises(DsftError, match="p.jsonl:1: the final assistant turn has reasoning"):
        encode_pair(pair, "deepseek_v31", tokenizer, thinking=False)
    dropped = encode_pair(pair, "deepseek_v31", tokenizer, thinking=False, reasoning="drop")
    assert dropped.prompt_ids == prompt_ids(PROMPT, "deepseek_v31", tokenizer, thinking=False)


def test_fit_pair_truncates_drops_and_counts():
    pair = EncodedPair([1, 2, 3], [4, 5, 6, 7], [4, 5, 8])
    stats = DataStats()
    assert fit_pair(pair, 7, "right", stats) == pair and stats.truncated == 0
    assert fit_pair(pair, 6, "right", stats) == EncodedPair([1, 2, 3], [4, 5, 6], [4, 5, 8]) and stats.truncated == 1
    assert fit_pair(pair, 6, "drop", stats) is None and stats.dropped_too_long == 1
    assert fit_pair(pair, 5, "right", stats) is None  # both answers cut to [4, 5]: no preference left
    assert fit_pair(pair, 3, "right", stats) is None  # the prompt fills the budget
    assert stats.dropped_no_target == 2


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_bad_records_stop_with_file_and_line_or_are_skipped_and_counted(tmp_path):
    good = {"instruction": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, {"instruction": "q", "chosen": "a"}, "{not json", good])
    with pytest.raises(DsftError, match=r"prefs.jsonl:2: field 'rejected' is missing"):
        load_pairs([path], "error", DataStats())
    stats = DataStats()
    pairs = load_pairs([path], "skip", stats)
    assert len(pairs) == 2 and stats.records_read == 4 and stats.skipped_bad == 2
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:4"]
    assert len(load_pairs([path, path], "skip", DataStats(), max_samples=3)) == 3


def test_datasets_split_validation_and_count_tokens(tmp_path, tokenizer):
    records = [{"instruction": f"what is {i} + 2?", "chosen": str(i + 2), "rejected": "hello"} for i in range(10)]
    data = DataConfig(train_files=[write_jsonl(tmp_path / "p.jsonl", records)], validation_ratio=0.2, max_length_tokens=64)
    train, validation, stats = build_preference_datasets(data, "deepseek_v3", tokenizer, seed=0)
    assert (len(train), len(validation)) == (8, 2) == (stats.train_examples, stats.validation_examples)
    assert set(train[0]) == {"prompt_ids", "chosen_ids", "rejected_ids"}
    answers = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in train)
    assert stats.trainable_tokens == answers and stats.train_tokens == answers + sum(2 * len(r["prompt_ids"]) for r in train)
    tiny = data.model_copy(update={"max_length_tokens": 8, "truncation": "drop"})
    with pytest.raises(DsftError, match="no preference pairs left"):
        build_preference_datasets(tiny, "deepseek_v3", tokenizer, seed=0)
