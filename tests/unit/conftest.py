"""A small byte-level BPE tokenizer with the DeepSeek chat tokens, shared by the unit tests."""

import pytest

from dsft.data.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    words = ["what", "is", "the", "answer", "think", "exact", "and", "sevens", "question", "hello"]
    chinese = ["你好", "请回答", "问题", "答案", "模型", "训练"]
    texts = [f"{words[i % 10]} {words[i * 7 % 10]} {chinese[i % 6]} {i * 37} + {i}?" for i in range(300)]
    return train_bpe_tokenizer(texts, vocab_size=500)
