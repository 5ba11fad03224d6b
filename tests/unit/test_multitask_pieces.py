"""Pure pieces of multitask heads: the weighted partial-label loss, last-token pooling, records, rows, batches."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsft.config import MultitaskConfig, validate_config
from dsft.data.bio import IGNORE_INDEX
from dsft.data.dataset import DataStats
from dsft.data.multitask import MultitaskCollator, load_multitask
from dsft.errors import DsftError
from dsft.models.multitask import HeadSpec, MultitaskModel, last_token_index


class StubBackbone(nn.Module):
    """An embedding table standing in for a transformer: hidden state = embedding of the token."""

    def __init__(self, vocab_size=16, hidden_size=4):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden_size, initializer_range=0.5, model_type="stub")
        self.embed = nn.Embedding(vocab_size, hidden_size)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))


HEADS = [HeadSpec("intent", "sequence", ["a", "b", "c"], loss_weight=2.0),
         HeadSpec("ner", "token", ["O", "B-X", "I-X"], loss_weight=0.5),
         HeadSpec("yes_no", "sequence", ["no", "yes"], loss_weight=1.0)]


def stub_model():
    torch.manual_seed(0)
    return MultitaskModel(StubBackbone(), HEADS, pad_token_id=0, seed=1)


def test_loss_is_the_weighted_sum_of_each_heads_mean_over_its_labelled_items():
    model = stub_model()
    input_ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [3, 4, 5, 6]])
    attention_mask = (input_ids != 0).long()
    intent = torch.tensor([1, IGNORE_INDEX, 2])  # record 1 has no intent label
    ner = torch.tensor([[0, 1, 2, IGNORE_INDEX], [IGNORE_INDEX] * 4, [1, IGNORE_INDEX, 0, 0]])  # record 1 untagged
    yes_no = torch.full((3,), IGNORE_INDEX)  # no record labelled: the head adds 0
    out = model(input_ids, attention_mask, labels_intent=intent, labels_ner=ner, labels_yes_no=yes_no)

    intent_ce = F.cross_entropy(out.logits["intent"][[0, 2]], torch.tensor([1, 2]))
    ner_logits = out.logits["ner"]
    ner_positions = [(0, 0), (0, 1), (0, 2), (2, 0), (2, 2), (2, 3)]
    ner_ce = F.cross_entropy(torch.stack([ner_logits[b, t] for b, t in ner_positions]),
                             torch.tensor([ner[b, t] for b, t in ner_positions]))
    torch.testing.assert_close(out.loss, 2.0 * intent_ce + 0.5 * ner_ce)
    torch.testing.assert_close(out.head_losses["intent"], intent_ce)
    torch.testing.assert_close(out.head_losses["ner"], ner_ce)
    assert out.head_losses["yes_no"].item() == 0.0
    assert {name: int(n) for name, n in out.head_items.items()} == {"intent": 2, "ner": 6, "yes_no": 0}
    out.loss.backward()
    assert model.heads["yes_no"].weight.grad.abs().sum() == 0  # no label, no gradient
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())


def test_a_head_without_labels_given_is_left_out_of_the_loss():
    model = stub_model()
    input_ids = torch.tensor([[5, 6, 7]])
    out = model(input_ids, labels_intent=torch.tensor([0]))
    torch.testing.assert_close(out.loss, 2.0 * F.cross_entropy(out.logits["intent"], torch.tensor([0])))
    assert set(out.head_losses) == {"intent"}
    assert model(input_ids).loss is None
    with pytest.raises(TypeError, match="labels_<head>"):
        model(input_ids, labels_other=torch.tensor([0]))


def test_last_token_index_with_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(torch.zeros_like(right), right, 0).tolist() == [2, 4, 0]
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(torch.zeros_like(left), left, 0).tolist() == [4, 4]
    ids = torch.tensor([[7, 8, 9, 2, 2], [7, 2, 2, 2, 2]])  # no mask: pad id 2 marks padding
    assert last_token_index(ids, None, 2).tolist() == [2, 0]


def test_sequence_heads_read_the_last_real_token_of_each_row():
    model = stub_model()
    input_ids = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [3, 4, 5, 6]])
    out = model(input_ids, (input_ids != 0).long())
    last_tokens = torch.tensor([7, 8, 6])
    expected_BC = model.heads["intent"](model.backbone.embed(last_tokens))
    torch.testing.assert_close(out.logits["intent"], expected_BC)
    assert out.logits["ner"].shape == (3, 4, 3)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


SETTINGS = MultitaskConfig(heads=[
    {"name": "intent", "kind": "sequence", "label_field": "intent"},
    {"name": "ner", "kind": "token", "label_field": "tags"},
])


def test_records_may_lack_some_heads_but_not_all(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"tokens": ["book", "paris"], "intent": "book", "tags": ["O", "B-LOC"]},
        {"tokens": ["hi", "bob"], "intent": None},
        {"tokens": ["rain", "rome"], "tags": ["O", "B-LOC"]},
    ])
    with pytest.raises(DsftError, match=r"d\.jsonl:2: no label for any head \(fields 'intent', 'tags'\)"):
        load_multitask([path], SETTINGS, "error", DataStats())
    stats = DataStats()
    records = load_multitask([path], SETTINGS, "skip", stats)
    assert [set(r.labels) for r in records] == [{"intent", "ner"}, {"ner"}]
    assert stats.records_read == 3 and stats.skipped_bad == 1


@pytest.mark.parametrize(("record", "message"), [
    ({"tokens": ["a"], "intent": True}, r"d\.jsonl:1: field 'intent' \(head intent\) is True"),
    ({"tokens": ["a", "b"], "tags": ["O"]}, r"d\.jsonl:1: field 'tags' has 1 tags for 2 words"),
    ({"tokens": ["a"], "tags": "O"}, r"d\.jsonl:1: field 'tags' \(head ner\) is a string"),
    ({"text": "a b", "intent": "x"}, r"d\.jsonl:1: field 'tokens' must be a non-empty list of words"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(DsftError, match=message):
        load_multitask([path], SETTINGS, "error", DataStats())


def test_collator_pads_ids_masks_and_token_labels_on_the_right():
    collate = MultitaskCollator(pad_token_id=2, heads=SETTINGS.heads)
    batch = collate([{"input_ids": [5, 6, 7], "labels_intent": 1, "labels_ner": [IGNORE_INDEX, 0, 1], "sample_id": 4},
                     {"input_ids": [8], "labels_intent": IGNORE_INDEX, "labels_ner": [IGNORE_INDEX], "sample_id": 9}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels_intent"].tolist() == [1, IGNORE_INDEX]
    assert batch["labels_ner"].tolist() == [[IGNORE_INDEX, 0, 1], [IGNORE_INDEX] * 3]
    assert batch["sample_id"].tolist() == [4, 9]


def test_task_multitask_needs_distinct_heads():
    base = {"model": {"preset": "tiny-qwen2"}, "data": {"train_files": ["x.jsonl"]}, "task": "multitask"}
    with pytest.raises(DsftError, match="task multitask needs multitask.heads"):
        validate_config(base)
    head = {"name": "a", "kind": "sequence", "label_field": "a"}
    with pytest.raises(DsftError, match="names must be distinct"):
        validate_config({**base, "multitask": {"heads": [head, head]}})


LONG = ["what", "is", "the", "answer", "think", "exact", "and", "sevens", "question", "hello"]


def test_rows_carry_ignore_labels_for_unlabelled_heads_and_fit_max_length(tmp_path, tokenizer):
    from dsft.config import DataConfig
    from dsft.data.bio import encode_words
    from dsft.data.multitask import encode_multitask, head_labels

    path = write_jsonl(tmp_path / "d.jsonl", [
        {"tokens": LONG, "intent": "ask", "tags": ["O"] * 9 + ["B-GREET"]},
        {"tokens": ["hello", "answer"], "tags": ["B-GREET", "O"]},
        {"tokens": ["think", "exact"], "intent": "say"},
    ])
    records = load_multitask([path], SETTINGS, "error", DataStats())
    labels = head_labels(SETTINGS.heads, records)
    assert labels == {"intent": ["ask", "say"], "ner": ["O", "B-GREET"]}
    data, stats = DataConfig(train_files=[path], max_length_tokens=64), DataStats()
    rows = encode_multitask(records, SETTINGS.heads, labels, tokenizer, SETTINGS, data, stats)
    ids, word_ids = encode_words(LONG, tokenizer, "space")
    assert rows[0]["input_ids"] == ids and rows[0]["labels_intent"] == 0
    first_tokens = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
    assert [rows[0]["labels_ner"][i] for i in first_tokens] == [0] * 9 + [1]
    assert sum(label != IGNORE_INDEX for label in rows[0]["labels_ner"]) == 10
    assert rows[1]["labels_intent"] == IGNORE_INDEX
    assert rows[2]["labels_ner"] == [IGNORE_INDEX] * len(rows[2]["input_ids"])
    for truncation, expected_rows in (("right", 3), ("drop", 2)):
        short = DataConfig(train_files=[path], max_length_tokens=8, truncation=truncation)
        fitted = encode_multitask(records, SETTINGS.heads, labels, tokenizer, SETTINGS, short, stats)
        assert len(fitted) == expected_rows and all(len(row["input_ids"]) <= 8 for row in fitted)
    assert stats.truncated == 1 and stats.dropped_too_long == 1
    assert fitted[0]["input_ids"] == rows[1]["input_ids"]  # the long record went, the short ones stay whole
