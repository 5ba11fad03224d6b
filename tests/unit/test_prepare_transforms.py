"""Record transforms of `dsft data prepare`: clean, pii, chunk, augment (exact outputs)."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections import Counter

import pytest

from dsft.data.augment import augment_record, augment_text, load_function, load_synonyms, segment_chinese
from dsft.data.chunk import chunk_text
from dsft.data.clean import clean_text
from dsft.data.pii import hash_id, is_valid_cn_id, luhn_valid, mask_pii, mask_record
from dsft.data.prepare_config import AugmentStep, ChunkStep, CleanStep, PiiStep
from dsft.errors import DsftError

# --- clean ----------------------------------------------------------------------------------------


def _clean(text: str, **settings) -> str:
    return clean_text(text, CleanStep(step="clean", **settings))


def test_clean_defaults_nfkc_controls_whitespace():
    text = "\ufeff  ＡＢＣ１２３\u200b是全角，\t\t保留。  \r\n\n\n\n第二段  "
    assert _clean(text) == "ABC123是全角， 保留。\n\n第二段"


def test_clean_strip_html():
    text = '<p class="x">你好 &amp; 再见</p><!-- 注释 <b>x</b> --><br/>第二行<br>a &lt;b&gt; < c'
    assert _clean(text, strip_html=True) == "你好 & 再见\n\n第二行\na <b> < c"


def test_clean_to_halfwidth_table():
    text = "你好，世界。【注意】“引号”、‘单’！？：；（括号）"
    assert _clean(text, fullwidth_punctuation="to_halfwidth") == "你好,世界.[注意]\"引号\",'单'!?:;(括号)"


def test_clean_to_fullwidth_only_after_han():
    text = "你好,世界!真的?是:对;好 (注释) ok, fine! 3.14"
    assert _clean(text, fullwidth_punctuation="to_fullwidth") == "你好，世界！真的？是：对；好 （注释） ok, fine! 3.14"


def test_clean_nfkc_keeps_chinese_punctuation_unless_to_halfwidth():
    assert _clean("好，ｏｋ！") == "好，ok！"
    assert _clean("好，ｏｋ！", nfkc=False) == "好，ｏｋ！"
    assert _clean("好，ｏｋ！", fullwidth_punctuation="to_halfwidth") == "好,ok!"


def test_clean_remove_latin_and_digits():
    assert _clean("价格 price 是 42 元 USD", remove_latin=True, remove_digits=True) == "价格 是 元"


def test_clean_everything_off_is_identity():
    text = "\u200b <b>ＡＢ</b>，\n\n\n\n"
    assert _clean(text, nfkc=False, whitespace=False, control_chars=False) == text


# --- pii ------------------------------------------------------------------------------------------

VALID_CN_ID = "11010519491231002X"
VALID_CN_ID_DIGITS = "310115198506123454"
VALID_CARD = "6222 0212 3456 7894"
PLANTED = {
    "email": ("zhang.san@example.com", "Write to zhang.san@example.com today.", "请发邮件到zhang.san@example.com。"),
    "phone": ("+86 138-0013-8000", "Call +86 138-0013-8000 now.", "手机号：+86 138-0013-8000，谢谢"),
    "cn_id": (VALID_CN_ID, f"ID {VALID_CN_ID} on file.", f"身份证号{VALID_CN_ID}已登记"),
    "bank_card": (VALID_CARD, f"Card {VALID_CARD} expired.", f"银行卡{VALID_CARD}已过期"),
    "ip": ("192.168.1.255", "Server 192.168.1.255 is down.", "服务器192.168.1.255宕机了"),
}


@pytest.mark.parametrize("kind", list(PLANTED))
@pytest.mark.parametrize("language", [1, 2])
def test_each_kind_is_masked_in_english_and_chinese(kind, language):
    value, *sentences = PLANTED[kind]
    counts = Counter()
    masked = mask_pii(sentences[language - 1], PiiStep(step="pii"), counts)
    assert masked == sentences[language - 1].replace(value, f"[{kind.upper()}]")
    assert counts == Counter({kind: 1})


def test_mask_all_kinds_in_one_text():
    text = ("联系zhang.san@example.com或13800138000、+1 415 555 2671，"
            f"身份证{VALID_CN_ID_DIGITS}，卡号4111-1111-1111-1111，IP 10.0.0.1 与 2001:db8::1。")
    counts = Counter()
    masked = mask_pii(text, PiiStep(step="pii"), counts)
    assert masked == "联系[EMAIL]或[PHONE]、[PHONE]，身份证[CN_ID]，卡号[BANK_CARD]，IP [IP] 与 [IP]。"
    assert counts == Counter({"phone": 2, "ip": 2, "email": 1, "cn_id": 1, "bank_card": 1})
    for digits in ("13800138000", "415", "2671", "310115", "4111", "10.0.0.1", "db8", "example"):
        assert digits not in masked


def test_invalid_numbers_are_not_masked():
    text = ("ID 110105194912310021 (bad check digit), 110105194902301234 (no Feb 30), "
            "card 4111 1111 1111 1112 (Luhn fails), ip 256.1.1.1, version 1.2.3.4.5, "
            "order 123456789012345678901234, time 12:30:45, phone 2800138000")
    counts = Counter()
    assert mask_pii(text, PiiStep(step="pii"), counts) == text
    assert counts == Counter()


def test_phone_inside_longer_digit_run_is_not_masked():
    text = "编号9913800138000123和订单113800138000"
    assert mask_pii(text, PiiStep(step="pii", kinds=["phone"]), Counter()) == text


def test_only_the_configured_kinds():
    counts = Counter()
    text = "a@b.cn 13800138000"
    assert mask_pii(text, PiiStep(step="pii", kinds=["phone"]), counts) == "a@b.cn [PHONE]"
    assert counts == Counter({"phone": 1})


def test_check_digits():
    assert is_valid_cn_id(VALID_CN_ID) and is_valid_cn_id(VALID_CN_ID.lower()) and is_valid_cn_id(VALID_CN_ID_DIGITS)
    assert not is_valid_cn_id("110105194912310021")
    assert luhn_valid("4111111111111111") and luhn_valid("6222021234567894")
    assert not luhn_valid("4111111111111112")


def test_hash_action_is_stable_salted_and_normalized():
    step = PiiStep(step="pii", action="hash", salt="s1")
    digest = hashlib.sha256(b"s113800138000").hexdigest()[:12]
    counts = Counter()
    masked = mask_pii("电话 13800138000 或 138-0013-8000", step, counts)
    assert masked == f"电话 [PHONE:{digest}] 或 [PHONE:{digest}]"
    assert counts == Counter({"phone": 2})
    other_salt = mask_pii("电话 13800138000", PiiStep(step="pii", action="hash", salt="s2"), Counter())
    assert re.fullmatch(r"电话 \[PHONE:[0-9a-f]{12}\]", other_salt) and digest not in other_salt
    assert mask_pii("Mail A@B.com", step, Counter()) == f"Mail [EMAIL:{hashlib.sha256(b's1a@b.com').hexdigest()[:12]}]"


def test_hash_id_is_full_salted_sha256():
    assert hash_id("user-7", "salt") == hashlib.sha256(b"saltuser-7").hexdigest()
    assert hash_id("user-7", "salt") != hash_id("user-7", "other")


def test_mask_record_texts_and_id_fields():
    record = {"user": 42, "session": "abc", "flag": True,
              "messages": [{"role": "user", "content": "我的邮箱是a@b.cn"},
                           {"role": "assistant", "content": "已记录13800138000"}]}
    step = PiiStep(step="pii", id_fields=["user", "session", "flag", "absent"], salt="k")
    counts = Counter()
    out = mask_record(record, "messages", step, counts)
    assert out == {"user": hash_id("42", "k"), "session": hash_id("abc", "k"), "flag": True,
                   "messages": [{"role": "user", "content": "我的邮箱是[EMAIL]"},
                                {"role": "assistant", "content": "已记录[PHONE]"}]}
    assert counts == Counter({"user_id": 2, "email": 1, "phone": 1})
    assert record["messages"][0]["content"] == "我的邮箱是a@b.cn"  # the input is not changed


# --- chunk ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from dsft.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(["hello world this is a test", "你好世界这是一个测试"] * 5, vocab_size=300)


def test_chunk_exact_windows(tokenizer):
    text = "hello world this is a test of chunking"
    chunks = chunk_text(text, tokenizer, max_tokens=4, stride_tokens=2)
    assert chunks == [
        "hello world this is", " this is a tes", " a test ", "t of", "of c", " chu", "hunk", "nkin", "ing",
    ]
    assert all(chunk in text for chunk in chunks)
    assert text.endswith(chunks[-1])


def test_chunk_overlap_is_max_minus_stride_tokens(tokenizer):
    text = "hello world this is a test hello world this is a test"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = chunk_text(text, tokenizer, max_tokens=5, stride_tokens=3)
    chunk_ids = [tokenizer(chunk, add_special_tokens=False)["input_ids"] for chunk in chunks]
    assert [len(c) for c in chunk_ids[:-1]] == [5] * (len(chunks) - 1)
    for first, second in itertools.pairwise(chunk_ids):
        assert first[3:] == second[:2]
    assert chunk_ids[0] + [i for c in chunk_ids[1:] for i in c[2:]] == ids
    assert text.endswith(chunks[-1])


def test_chunk_chinese(tokenizer):
    assert chunk_text("你好世界这是一个测试", tokenizer, max_tokens=4, stride_tokens=3) == ["你好世界这是一个", "是一个测试"]


def test_chunk_short_text_is_whole_and_characters_without_tokenizer(tokenizer):
    assert chunk_text(" hello ", tokenizer, max_tokens=8, stride_tokens=8) == [" hello "]
    assert chunk_text("一二三四五六七", None, max_tokens=3, stride_tokens=2) == ["一二三", "三四五", "五六七"]
    assert chunk_text("一二三四五六", None, max_tokens=3, stride_tokens=3) == ["一二三", "四五六"]
    assert chunk_text("一二三四", None, max_tokens=3, stride_tokens=2) == ["一二三", "三四"]


def test_chunk_bad_stride():
    with pytest.raises(ValueError, match="stride_tokens"):
        chunk_text("abc", None, max_tokens=2, stride_tokens=3)
    with pytest.raises(ValueError):
        ChunkStep(step="chunk", max_tokens=8, stride_tokens=9)


# --- augment --------------------------------------------------------------------------------------

SYNONYMS = {"quick": ["fast", "rapid"], "happy": ["glad"], "快速": ["迅速"], "高兴": ["开心", "愉快"]}


def _step(**settings) -> AugmentStep:
    return AugmentStep(step="augment", **settings)


def test_augment_english_exact():
    step = _step(synonym_prob=1.0, swap_count=0, delete_prob=0.0)
    assert augment_text("the  quick fox is happy", step, random.Random(0), SYNONYMS, None) == "the rapid fox is glad"
    step = _step(synonym_prob=0.5, swap_count=1, delete_prob=0.2)
    text = "the quick brown fox is happy today"
    assert augment_text(text, step, random.Random(0), SYNONYMS, None) == "fox quick brown the is happy today"
    assert augment_text(text, step, random.Random(0), SYNONYMS, None) == augment_text(
        text, step, random.Random(0), SYNONYMS, None)


def test_augment_chinese_longest_match_exact():
    assert segment_chinese("我今天很高兴，快速地跑步。", SYNONYMS) == ["我", "今", "天", "很", "高兴", "，", "快速", "地", "跑", "步", "。"]
    assert segment_chinese("高兴高 兴", {"高": ["x"], "高兴": ["y"]}) == ["高兴", "高", "兴"]
    step = _step(synonym_prob=1.0, swap_count=0, delete_prob=0.0)
    assert augment_text("我很高兴，快速地跑步。", step, random.Random(0), SYNONYMS, None) == "我很愉快，迅速地跑步。"
    step = _step(synonym_prob=0.5, swap_count=1, delete_prob=0.2)
    assert augment_text("我今天很高兴，快速地跑步。", step, random.Random(0), SYNONYMS, None) == "快速今天很高兴，我地跑步。"


def test_augment_never_deletes_everything():
    step = _step(synonym_prob=0.0, swap_count=0, delete_prob=0.99)
    for seed in range(20):
        assert augment_text("one two three", step, random.Random(seed), {}, None) in ("one", "two", "three", "one two",
                                                                                      "two three", "one three",
                                                                                      "one two three")
    assert augment_text("   ", step, random.Random(0), {}, None) == "   "


def test_augment_record_prompt_only_marks_and_back_translates():
    record = {"instruction": "be quick", "input": "", "output": "quick answer", "id": 3}
    seen = []

    def back_translate(text):
        seen.append(text)
        return text.upper()

    step = _step(synonym_prob=1.0, swap_count=0, delete_prob=0.0)
    out = augment_record(record, "alpaca", step, random.Random(0), SYNONYMS, back_translate)
    assert out == {"instruction": "BE RAPID", "input": "", "output": "quick answer", "id": 3, "augmented": True}
    assert seen == ["be rapid"]
    assert "augmented" not in record and record["instruction"] == "be quick"
    everything = augment_record(record, "alpaca", _step(synonym_prob=1.0, swap_count=0, delete_prob=0.0,
                                                        fields="all"), random.Random(0), SYNONYMS, None)
    assert everything == {"instruction": "be rapid", "input": "", "output": "rapid answer", "id": 3, "augmented": True}


def test_augment_messages_keeps_assistant_turns():
    record = {"messages": [{"role": "user", "content": "很高兴"}, {"role": "assistant", "content": "很高兴"}]}
    step = _step(synonym_prob=1.0, swap_count=0, delete_prob=0.0)
    out = augment_record(record, "messages", step, random.Random(0), SYNONYMS, None)
    assert out["messages"] == [{"role": "user", "content": "很愉快"}, {"role": "assistant", "content": "很高兴"}]


def test_load_synonyms(tmp_path):
    path = tmp_path / "syn.json"
    path.write_text(json.dumps(SYNONYMS, ensure_ascii=False), encoding="utf-8")
    assert load_synonyms(path) == SYNONYMS
    path.write_text('{"a": "b"}', encoding="utf-8")
    with pytest.raises(DsftError, match=r"^train_steps\.augment\.synonyms_file: .* must hold a JSON object"):
        load_synonyms(path)
    path.write_text("{", encoding="utf-8")
    with pytest.raises(DsftError, match=r"synonyms_file: .* is not valid JSON"):
        load_synonyms(path)
    with pytest.raises(DsftError, match=r"synonyms_file: file not found"):
        load_synonyms(tmp_path / "missing.json")


def test_load_function_module_and_file(tmp_path):
    assert load_function("json:dumps", "train_steps[0].back_translation") is json.dumps
    path = tmp_path / "bt.py"
    path.write_text("def round_trip(text):\n    return text[::-1]\n", encoding="utf-8")
    assert load_function(f"{path}:round_trip", "train_steps[0].back_translation")("ab") == "ba"
    with pytest.raises(DsftError, match=r"^train_steps\[0\]\.back_translation: .* has no function 'nope'"):
        load_function(f"{path}:nope", "train_steps[0].back_translation")
    with pytest.raises(DsftError, match=r"^train_steps\[0\]\.back_translation: 'bt' is not \"module:function\""):
        load_function("bt", "train_steps[0].back_translation")
