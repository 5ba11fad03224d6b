"""BIO tags and their alignment to subword tokens: exact ids and labels in Chinese and English, validation errors,
reading predictions back per word, tag order and word splitting."""

import copy

import pytest
from tokenizers import processors

from dsft.data.bio import (
    IGNORE_INDEX,
    align_labels,
    encode_words,
    split_words,
    tag_names,
    validate_bio,
    validate_words,
    word_predictions,
)
from dsft.errors import DsftError
from dsft.data.tokenizer import train_bpe_tokenizer

TAG_IDS = {"O": 0, "B-LOC": 1, "I-LOC": 2, "B-PER": 3, "I-PER": 4}


@pytest.fixture(scope="module")
def tokenizer():
    """A BPE trained on a few pieces: 张 三 在, Alice and ' visited' become single tokens; 北 京 and
    ' Zanzibar', never seen, stay split into bytes."""
    pieces = ["张", "三", "在", "Alice", " Alice", " visited", " in", " lives", ".", " ."] * 50
    return train_bpe_tokenizer(pieces, vocab_size=300)


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The same tokenizer framing every text with its BOS token, as DeepSeek's does."""
    framed = copy.deepcopy(tokenizer)
    framed._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{framed.bos_token} $A", special_tokens=[(framed.bos_token, framed.bos_token_id)])
    return framed


def piece_ids(tokenizer, piece: str) -> list[int]:
    return tokenizer(piece, add_special_tokens=False)["input_ids"]


def test_chinese_characters_align_exactly(tokenizer):
    words, tags = ["张", "三", "在", "北", "京"], ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]
    input_ids, word_ids = encode_words(words, tokenizer, "none")
    # Each character on its own: a seen one is one token, an unseen one its three UTF-8 bytes.
    assert input_ids == [i for w in words for i in piece_ids(tokenizer, w)]
    assert tokenizer.convert_ids_to_tokens(input_ids[:3]) == ["å¼ł", "ä¸ī", "åľ¨"]
    assert word_ids == [0, 1, 2, 3, 3, 3, 4, 4, 4]
    labels = align_labels(word_ids, [TAG_IDS[t] for t in tags])
    assert labels == [3, 4, 0, 1, IGNORE_INDEX, IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX]


def test_english_words_of_several_tokens_label_their_first_token(tokenizer):
    words, tags = ["Alice", "visited", "Zanzibar", "."], ["B-PER", "O", "B-LOC", "O"]
    input_ids, word_ids = encode_words(words, tokenizer, "space")
    pieces = ["Alice", " visited", " Zanzibar", " ."]
    assert input_ids == [i for p in pieces for i in piece_ids(tokenizer, p)]
    zanzibar = len(piece_ids(tokenizer, " Zanzibar"))
    assert zanzibar == 9  # Ġ Z a n z i b a r: no merge was learned for it
    assert word_ids == [0, 1] + [2] * zanzibar + [3]
    labels = align_labels(word_ids, [TAG_IDS[t] for t in tags])
    assert labels == [3, 0, 1] + [IGNORE_INDEX] * (zanzibar - 1) + [0]
    assert tokenizer.decode(input_ids) == "Alice visited Zanzibar ."


def test_the_tokenizer_framing_carries_no_label(bos_tokenizer):
    input_ids, word_ids = encode_words(["张", "在"], bos_tokenizer, "none")
    assert input_ids == [bos_tokenizer.bos_token_id, *piece_ids(bos_tokenizer, "张"), *piece_ids(bos_tokenizer, "在")]
    assert word_ids == [None, 0, 1]
    assert align_labels(word_ids, [3, 0]) == [IGNORE_INDEX, 3, 0]


def test_word_predictions_read_first_tokens_and_mark_cut_off_words():
    word_ids = [None, 0, 1, 1, 1, 2]
    token_predictions = [9, 3, 1, 4, 4, 0]
    assert word_predictions(word_ids, token_predictions, 3) == [3, 1, 0]
    # Truncated after the second token of word 1: word 2 has no token and gets `missing`.
    assert word_predictions(word_ids[:4], token_predictions[:4], 3, missing=-1) == [3, 1, -1]


def test_validate_bio_names_the_record_and_the_counts():
    with pytest.raises(DsftError) as error:
        validate_bio(["Alice", "lives", "here"], ["B-PER", "O"], "data.jsonl:7", "tags")
    assert str(error.value).startswith("data.jsonl:7: field 'tags' has 2 tags for 3 words")


@pytest.mark.parametrize("tags, message", [
    (["B-PER", "X"], "tag 1 is 'X'; allowed: O, B-TYPE, I-TYPE"),
    (["B-PER", "B-"], "tag 1 is 'B-'"),
    (["B-PER", 3], "tag 1 is 3"),
    (["O", "I-LOC"], "tag 1 'I-LOC' follows 'O'; in BIO an entity starts with B-LOC (word 1: 'b')"),
    (["B-PER", "I-LOC"], "tag 1 'I-LOC' follows 'B-PER'"),
    (["I-PER", "O"], "tag 0 'I-PER' follows 'O'"),
])
def test_validate_bio_rejects_bad_tags(tags, message):
    with pytest.raises(DsftError, match="^f.jsonl:2: field 'ner'") as error:
        validate_bio(["a", "b"], tags, "f.jsonl:2", "ner")
    assert message in str(error.value)


def test_validate_bio_accepts_a_valid_sequence():
    validate_bio(["a", "b", "c", "d"], ["B-PER", "I-PER", "B-PER", "O"], "f:1", "tags")


@pytest.mark.parametrize("words, message", [
    ([], "must be a non-empty list of words"),
    ("Alice lives", "must be a non-empty list of words"),
    (["Alice", " "], "word 1 is ' '; words are non-blank strings"),
    (["Alice", 5], "word 1 is 5"),
])
def test_validate_words_names_the_record(words, message):
    with pytest.raises(DsftError, match="^f.jsonl:4: field 'tokens'") as error:
        validate_words(words, "f.jsonl:4", "tokens")
    assert message in str(error.value)


def test_tag_names_put_o_first_then_types_with_b_before_i():
    tag_lists = [["I-PER", "B-PER", "O"], ["B-LOC", "I-LOC"], ["B-ORG"]]
    assert tag_names(tag_lists) == ["O", "B-LOC", "I-LOC", "B-ORG", "B-PER", "I-PER"]
    assert tag_names([["O"]]) == ["O"]


def test_split_words_by_space_or_by_character():
    assert split_words("  Alice lives\tin  Paris ", "space") == ["Alice", "lives", "in", "Paris"]
    assert split_words("张三 在北京", "none") == ["张", "三", "在", "北", "京"]
