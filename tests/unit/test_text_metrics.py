"""Generation metrics: BLEU/chrF equal sacrebleu's, ROUGE equals rouge-score's, SQuAD-style EM/F1 on Chinese
and English, no-reference data, custom checks, the bootstrap and semantic similarity."""

import re

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from dsft.config import CheckConfig, EvalConfig
from dsft.errors import DsftError
from dsft.eval import text_metrics
from dsft.eval.text_metrics import (
    NO_REFERENCES,
    ChineseCharTokenizer,
    answer_tokens,
    exact_match,
    mostly_chinese,
    resample_indices,
    score_generations,
    squad_normalize,
    token_f1,
)

ENGLISH_PREDICTIONS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog",
    "It is raining today in Paris",
    "Paris is the capital of France.",
    "no idea",
]
ENGLISH_REFERENCES = [
    "The cat is sitting on the mat.",
    "The quick brown fox jumped over the lazy dog.",
    "Today it rains in Paris.",
    "Paris is the capital of France.",
    "The answer is 42.",
]
CHINESE_PREDICTIONS = ["猫坐在垫子上。", "今天北京下雨了", "中华人民共和国的首都是北京", "我不知道", "机器学习很有趣"]
CHINESE_REFERENCES = [
    "猫在垫子上。",
    "北京今天下雨。",
    "中华人民共和国的首都是北京。",
    "答案是四十二。",
    "深度学习很有趣！",
]


def _settings(**overrides):
    return EvalConfig(**{"bootstrap_resamples": 0, **overrides})


def _score(predictions, references, **overrides):
    return score_generations(predictions, references, ["prompt"] * len(predictions), _settings(**overrides))


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Cat, sat!  ", "cat sat"),
        ("北京。", "北京"),
        ("“你好”，世界！（测试）《书》、；：‘引’？", "你好世界测试书引"),
        ("ＡＢＣ　１２３", "abc 123"),
        ("an apple a day; theory", "apple day theory"),
    ],
)
def test_squad_normalize(text, normalized):
    assert squad_normalize(text) == normalized


def test_answer_tokens_split_han_characters_and_keep_words():
    tokens = answer_tokens("中华人民 Republic of China, 1949")
    assert tokens == ["中", "华", "人", "民", "republic", "of", "china", "1949"]


@pytest.mark.parametrize(
    ("prediction", "reference", "expected_em", "expected_f1"),
    [
        # Tokens "cat sat" vs "cat sat down": precision 2/2, recall 2/3.
        ("the cat sat", "a cat sat down", 0.0, 2 * (1 * 2 / 3) / (1 + 2 / 3)),
        ("北京。", "北京", 1.0, 1.0),
        ("中华人民", "中华", 0.0, 2 * (2 / 4 * 2 / 2) / (2 / 4 + 2 / 2)),
        ("北 京", "北京", 1.0, 1.0),
        ("An Apple!", "apple", 1.0, 1.0),
        ("答案是 42", "42", 0.0, 2 * (1 / 4 * 1) / (1 / 4 + 1)),
        ("猫猫", "猫", 0.0, 2 * (1 / 2 * 1) / (1 / 2 + 1)),
        ("", "", 1.0, 1.0),
        ("the", "", 1.0, 1.0),
        ("", "x", 0.0, 0.0),
        ("dog", "cat", 0.0, 0.0),
    ],
)
def test_exact_match_and_f1(prediction, reference, expected_em, expected_f1):
    assert exact_match(prediction, reference) == expected_em
    assert token_f1(prediction, reference) == pytest.approx(expected_f1, abs=1e-12)


def test_corpus_exact_match_and_f1_are_means():
    result = _score(
        ["the cat sat", "北京。", "中华人民"], ["a cat sat down", "北京", "中华"], metrics=["exact_match", "f1"]
    )
    assert result.per_example["exact_match"] == [0.0, 1.0, 0.0]
    assert result.per_example["f1"] == pytest.approx([0.8, 1.0, 2 / 3])
    assert result.corpus == pytest.approx({"exact_match": 1 / 3, "f1": (0.8 + 1 + 2 / 3) / 3})


def test_bleu_and_chrf_equal_sacrebleu_on_english():
    result = _score(ENGLISH_PREDICTIONS, ENGLISH_REFERENCES, metrics=["bleu", "chrf"])
    assert result.corpus["bleu"] == sacrebleu.corpus_bleu(ENGLISH_PREDICTIONS, [ENGLISH_REFERENCES]).score
    assert result.corpus["chrf"] == sacrebleu.corpus_chrf(ENGLISH_PREDICTIONS, [ENGLISH_REFERENCES]).score
    pairs = list(zip(ENGLISH_PREDICTIONS, ENGLISH_REFERENCES))
    assert result.per_example["bleu"] == [sacrebleu.sentence_bleu(p, [r]).score for p, r in pairs]
    assert result.per_example["chrf"] == [sacrebleu.sentence_chrf(p, [r]).score for p, r in pairs]
    assert result.per_example["bleu"][3] == pytest.approx(100.0)
    assert result.notes == ["BLEU tokenize=13a (references not mostly Chinese)"]
    assert list(result.corpus) == ["bleu", "chrf"]


def test_bleu_on_chinese_uses_the_zh_tokenizer():
    result = _score(CHINESE_PREDICTIONS, CHINESE_REFERENCES, metrics=["bleu", "chrf"])
    zh_bleu = sacrebleu.corpus_bleu(CHINESE_PREDICTIONS, [CHINESE_REFERENCES], tokenize="zh").score
    assert result.corpus["bleu"] == zh_bleu
    assert zh_bleu != sacrebleu.corpus_bleu(CHINESE_PREDICTIONS, [CHINESE_REFERENCES], tokenize="13a").score
    assert result.per_example["bleu"] == [
        sacrebleu.sentence_bleu(p, [r], tokenize="zh").score for p, r in zip(CHINESE_PREDICTIONS, CHINESE_REFERENCES)
    ]
    assert result.corpus["chrf"] == sacrebleu.corpus_chrf(CHINESE_PREDICTIONS, [CHINESE_REFERENCES]).score
    assert result.notes == ["BLEU tokenize=zh (references mostly Chinese)"]


def test_explicit_bleu_tokenize_is_used():
    result = _score(CHINESE_PREDICTIONS, CHINESE_REFERENCES, metrics=["bleu"], bleu_tokenize="char")
    assert (
        result.corpus["bleu"] == sacrebleu.corpus_bleu(CHINESE_PREDICTIONS, [CHINESE_REFERENCES], tokenize="char").score
    )
    assert result.notes == ["BLEU tokenize=char (eval.bleu_tokenize)"]


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["中文 abcdefg"], False),  # 2 Han of 9 non-space characters: 22%
        (["中文中 abcdef"], True),  # 3 of 9: 33%
        (["abc", "中文中文"], True),  # counted over all texts: 4 of 7
        (["   "], False),
        ([], False),
    ],
)
def test_mostly_chinese(texts, expected):
    assert mostly_chinese(texts) is expected


def test_rouge_on_words_equals_rouge_score():
    result = _score(ENGLISH_PREDICTIONS, ENGLISH_REFERENCES, metrics=["rouge"])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    expected = [scorer.score(r, p) for p, r in zip(ENGLISH_PREDICTIONS, ENGLISH_REFERENCES)]
    for rouge_type in ("rouge1", "rouge2", "rougeL"):
        assert result.per_example[rouge_type] == [score[rouge_type].fmeasure for score in expected]
        assert result.corpus[rouge_type] == float(np.mean([score[rouge_type].fmeasure for score in expected]))
    assert result.notes == ["ROUGE on words (references not mostly Chinese)"]


def test_rouge_on_chinese_characters_equals_rouge_score_with_that_tokenizer():
    result = _score(CHINESE_PREDICTIONS, CHINESE_REFERENCES, metrics=["rouge"])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=ChineseCharTokenizer())
    expected = [scorer.score(r, p) for p, r in zip(CHINESE_PREDICTIONS, CHINESE_REFERENCES)]
    for rouge_type in ("rouge1", "rouge2", "rougeL"):
        assert result.per_example[rouge_type] == [score[rouge_type].fmeasure for score in expected]
        assert result.corpus[rouge_type] == float(np.mean([score[rouge_type].fmeasure for score in expected]))
    # 猫坐在垫子上 (6 characters) vs 猫在垫子上 (5): 5 shared unigrams, F = 2 * 5/6 * 1 / (5/6 + 1).
    assert result.per_example["rouge1"][0] == pytest.approx(10 / 11)
    assert result.notes == ["ROUGE on characters (references mostly Chinese)"]
    # rouge-score's own tokenizer keeps only a-z and 0-9: Chinese would score nothing.
    assert rouge_scorer.RougeScorer(["rouge1"]).score("猫在垫子上", "猫坐在垫子上")["rouge1"].fmeasure == 0.0


def test_rouge_tokenization_setting_overrides_auto():
    result = _score(ENGLISH_PREDICTIONS, ENGLISH_REFERENCES, metrics=["rouge"], rouge_tokenization="char")
    assert result.notes == ["ROUGE on characters (eval.rouge_tokenization)"]


def test_chinese_char_tokenizer():
    tokens = ChineseCharTokenizer().tokenize("我爱 Python3，和NLP! café_x")
    assert tokens == ["我", "爱", "python3", "和", "nlp", "café", "x"]


def test_no_reference_answers_leave_metrics_unavailable_and_checks_running():
    checks = [CheckConfig(name="says_hi", regex=r"\bhi\b")]
    result = _score(["hi there", "bye"], [None, None], checks=checks)
    names = ["exact_match", "f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL"]
    assert result.unavailable == {
        **{name: NO_REFERENCES for name in names},
        "semantic_similarity": "eval.embedding_model not set",
    }
    assert result.corpus == {"says_hi": 0.5}
    assert result.per_example == {"says_hi": [1.0, 0.0]}
    assert "perplexity" not in result.unavailable


def test_examples_without_reference_are_left_out():
    result = _score(["Paris", "x", "Rome"], ["Paris", None, "Milan"], metrics=["exact_match", "bleu"])
    assert result.per_example["exact_match"] == [1.0, None, 0.0]
    assert result.per_example["bleu"][1] is None
    assert result.corpus["exact_match"] == 0.5
    assert result.corpus["bleu"] == sacrebleu.corpus_bleu(["Paris", "Rome"], [["Paris", "Milan"]]).score
    assert result.notes[0] == "reference-based metrics on 2 of 3 examples (1 without a reference answer)"


CHECK_FILE = """
import json

def valid_json(answer, reference, prompt):
    try:
        json.loads(answer)
    except ValueError:
        return False
    return True

def length_ratio(answer, reference, prompt):
    return len(answer) / len(reference)

def broken(answer, reference, prompt):
    if answer == "b":
        raise KeyError("boom")
    return 0

def text(answer, reference, prompt):
    return "yes"
"""


@pytest.fixture
def check_file(tmp_path):
    path = tmp_path / "checks.py"
    path.write_text(CHECK_FILE, encoding="utf-8")
    return path


def test_python_and_regex_checks(check_file, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    checks = [
        CheckConfig(name="json", python=f"{check_file}:valid_json"),
        CheckConfig(name="ratio", python="checks:length_ratio"),
        CheckConfig(name="mentions_price", regex=r"(?i)price|价格"),
    ]
    answers = ['{"price": 3}', "价格是三元", "not json"]
    settings = _settings(metrics=[], checks=checks)
    result = score_generations(answers, ["ab", "abcde", "abcdefgh"], ["p1", "p2", "p3"], settings)
    assert result.per_example == {
        "json": [1.0, 0.0, 0.0],
        "ratio": [6.0, 1.0, 1.0],
        "mentions_price": [1.0, 1.0, 0.0],
    }
    assert result.corpus == pytest.approx({"json": 1 / 3, "ratio": 8 / 3, "mentions_price": 2 / 3})


def test_checks_receive_answer_reference_and_prompt(tmp_path):
    path = tmp_path / "echo.py"
    path.write_text("seen = []\ndef record(a, r, p):\n    seen.append((a, r, p))\n    return 1\n", encoding="utf-8")
    checks = [CheckConfig(name="record", python=f"{path}:record")]
    loaded = text_metrics.load_checks(checks)
    assert [loaded[0].function("a", None, "p")] == [1]
    result = score_generations(["a1", "a2"], ["r1", None], ["p1", "p2"], _settings(metrics=[], checks=checks))
    assert result.per_example["record"] == [1.0, 1.0]


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (CheckConfig(name="c", regex="(unclosed"), r"eval\.checks\[0\]\.regex: not a valid Python regular expression"),
        (CheckConfig(name="c", python="no_colon"), r"eval\.checks\[0\]\.python: 'no_colon' is not \"module:function\""),
        (CheckConfig(name="c", python="missing.py:f"), r"eval\.checks\[0\]\.python: file not found: missing\.py"),
        (
            CheckConfig(name="c", python="dsft_no_such_module:f"),
            r"eval\.checks\[0\]\.python: cannot import dsft_no_such_module",
        ),
        (CheckConfig(name="bleu", regex="x"), r"eval\.checks\[0\]\.name: 'bleu' is already a metric name"),
    ],
)
def test_bad_checks_are_config_errors(check, message):
    with pytest.raises(DsftError, match=message):
        _score(["a"], ["a"], checks=[check])


def test_check_file_failing_at_import(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("raise RuntimeError('no config')\n", encoding="utf-8")
    message = rf"^eval\.checks\[0\]\.python: loading {re.escape(str(path))} failed: RuntimeError: no config$"
    with pytest.raises(DsftError, match=message):
        _score(["a"], ["a"], checks=[CheckConfig(name="c", python=f"{path}:f")])


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("broken", r"^eval\.checks\[0\] \(c\) raised KeyError on example 1: 'boom'$"),
        ("text", r"^eval\.checks\[0\] \(c\) returned str on example 0; expected a bool or a number$"),
        ("nothing", r"eval\.checks\[0\]\.python: .*checks\.py has no function 'nothing'"),
    ],
)
def test_failing_check_functions_name_the_check_and_example(check_file, function, message):
    checks = [CheckConfig(name="c", python=f"{check_file}:{function}")]
    with pytest.raises(DsftError, match=message):
        _score(["a", "b"], ["a", "b"], checks=checks)


def test_bootstrap_is_deterministic_and_seeded():
    settings = _settings(bootstrap_resamples=200, metrics=["exact_match", "f1", "bleu", "chrf", "rouge"])
    first = score_generations(ENGLISH_PREDICTIONS, ENGLISH_REFERENCES, ENGLISH_PREDICTIONS, settings)
    again = score_generations(ENGLISH_PREDICTIONS, ENGLISH_REFERENCES, ENGLISH_PREDICTIONS, settings)
    assert first.ci == again.ci
    assert set(first.ci) == set(first.corpus)
    reseeded = score_generations(
        ENGLISH_PREDICTIONS, ENGLISH_REFERENCES, ENGLISH_PREDICTIONS, settings.model_copy(update={"seed": 1})
    )
    assert reseeded.ci != first.ci
    assert _score(ENGLISH_PREDICTIONS, ENGLISH_REFERENCES).ci == {}


def test_bootstrap_of_a_mean_metric_is_the_percentile_interval_of_resampled_means():
    settings = _settings(bootstrap_resamples=50, confidence=0.9, seed=7, metrics=["f1"])
    result = score_generations(ENGLISH_PREDICTIONS, ENGLISH_REFERENCES, ENGLISH_PREDICTIONS, settings)
    scores = np.array(result.per_example["f1"])
    means = [scores[indices].mean() for indices in resample_indices(5, 50, seed=7)]
    assert result.ci["f1"] == tuple(np.percentile(means, [5, 95]).tolist())


def test_bootstrap_of_bleu_recomputes_sacrebleu_on_each_resample():
    settings = _settings(bootstrap_resamples=20, seed=3, metrics=["bleu", "chrf"])
    result = score_generations(ENGLISH_PREDICTIONS, ENGLISH_REFERENCES, ENGLISH_PREDICTIONS, settings)
    for name, corpus_score in (("bleu", sacrebleu.corpus_bleu), ("chrf", sacrebleu.corpus_chrf)):
        resampled = []
        for indices in resample_indices(5, 20, seed=3):
            hypotheses = [ENGLISH_PREDICTIONS[i] for i in indices]
            references = [ENGLISH_REFERENCES[i] for i in indices]
            resampled.append(corpus_score(hypotheses, [references]).score)
        assert result.ci[name] == tuple(np.percentile(resampled, [2.5, 97.5]).tolist())


@pytest.fixture(scope="module")
def embedding_model_dir(tmp_path_factory, tokenizer):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("embedder")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _hand_similarity(model_dir, text_a, text_b):
    """Cosine of the per-token mean of the last hidden state, one text at a time (no padding)."""
    import torch
    from transformers import AutoTokenizer, BertModel

    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), BertModel.from_pretrained(model_dir).eval()
    vectors = []
    for text in (text_a, text_b):
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).last_hidden_state[0]
        vectors.append(hidden.mean(0).numpy().astype(np.float64))
    return float(vectors[0] @ vectors[1] / np.linalg.norm(vectors[0]) / np.linalg.norm(vectors[1]))


def test_semantic_similarity(embedding_model_dir):
    predictions = ["what is the answer", "你好 hello", "the question is exact"]
    references = ["what is the answer", "模型 训练 think", None]
    result = _score(predictions, references, metrics=[], embedding_model=str(embedding_model_dir))
    similarities = result.per_example["semantic_similarity"]
    assert similarities[0] == pytest.approx(1.0, abs=1e-6)
    assert similarities[1] == pytest.approx(
        _hand_similarity(embedding_model_dir, predictions[1], references[1]), abs=1e-5
    )
    assert similarities[1] < 0.999
    assert similarities[2] is None
    assert result.corpus["semantic_similarity"] == pytest.approx((similarities[0] + similarities[1]) / 2)


def test_missing_embedding_model_names_the_key(tmp_path):
    with pytest.raises(DsftError, match=r"^eval\.embedding_model: .*nowhere is not a directory"):
        _score(["a"], ["a"], metrics=[], embedding_model=str(tmp_path / "nowhere"))


def test_mismatched_lengths_are_a_programming_error():
    with pytest.raises(ValueError, match="2 predictions, 1 references, 2 prompts"):
        score_generations(["a", "b"], ["a"], ["p", "p"], _settings())
