"""Scores of generated answers against references: exact match, token F1, BLEU, chrF, ROUGE, semantic
similarity and the config's custom checks, each with a bootstrap confidence interval.

BLEU and chrF are sacrebleu's, ROUGE is rouge-score's: the numbers equal what those libraries print
for the same inputs. Exact match and F1 follow the SQuAD evaluation script, with the normalization
extended to Chinese (full-width punctuation removed, each Han character one token).
"""

from __future__ import annotations

import numbers
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF

from dsft.errors import DsftError
from dsft.userfunc import load_function

if TYPE_CHECKING:
    from dsft.config import CheckConfig, EvalConfig

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
MOSTLY_CHINESE_SHARE = 0.3
"""Text is mostly Chinese when more than this share of its non-space characters are Han characters."""
NO_REFERENCES = "the data has no reference answers"
EMBEDDING_BATCH_SIZE = 32
"""Texts embedded per forward pass of the semantic-similarity model."""

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_HAN_CHAR = re.compile(f"[{_HAN}]")
# A Han character alone, or a run of anything else up to whitespace or a Han character.
_ANSWER_TOKEN = re.compile(rf"[{_HAN}]|[^\s{_HAN}]+")
# A Han character alone, or a run of letters and digits that are not Han (punctuation is dropped).
_ROUGE_CHAR_TOKEN = re.compile(rf"[{_HAN}]|(?:(?![{_HAN}])[^\W_])+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass
class MetricsResult:
    """Scores of one set of generations; every metric in corpus has a per_example list and, with
    bootstrap resamples, an interval in ci."""

    corpus: dict[str, float] = field(default_factory=dict)
    """Metric name -> corpus value: 0..100 for bleu and chrf (as sacrebleu), 0..1 for the rest."""
    per_example: dict[str, list[float | None]] = field(default_factory=dict)
    """Metric name -> one score per example; None where the example has no reference answer."""
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Metric name -> (low, high) percentile-bootstrap interval of the corpus value."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Metric name -> why it could not be computed."""
    notes: list[str] = field(default_factory=list)
    """How the metrics were computed where that was chosen from the data (tokenization)."""


def score_generations(
    predictions: Sequence[str], references: Sequence[str | None], prompts: Sequence[str], settings: EvalConfig
) -> MetricsResult:
    """Score predictions (answers without reasoning) against references with the metrics of settings.

    Metrics: settings.metrics (perplexity excepted: it needs the model), semantic_similarity when
    settings.embedding_model is set, and one per settings.checks entry. Examples whose reference
    is None are left out of the reference-based metrics. Raises DsftError for a check that cannot
    be loaded or fails, and for an embedding model that cannot be loaded; ValueError when the three
    lists differ in length.
    """
    if not len(predictions) == len(references) == len(prompts):
        raise ValueError(f"{len(predictions)} predictions, {len(references)} references, {len(prompts)} prompts")
    wanted = [name for name in settings.metrics if name != "perplexity"]
    checks = load_checks(settings.checks, reserved=_metric_names(wanted))  # fail before any slow scoring
    result = MetricsResult()
    corpus_stats = _score_with_references(result, list(predictions), list(references), wanted, settings)
    _score_semantic_similarity(result, predictions, references, settings.embedding_model)
    for check in checks:
        _score_check(result, check, predictions, references, prompts)
    _add_intervals(result, corpus_stats, settings.bootstrap_resamples, settings.confidence, settings.seed)
    return result


def _metric_names(wanted: list[str]) -> set[str]:
    names = {name for name in wanted if name != "rouge"} | {"semantic_similarity"}
    return names | (set(ROUGE_TYPES) if "rouge" in wanted else set())


# --- reference-based metrics ---------------------------------------------------------------------


@dataclass
class _CorpusStats:
    """A sacrebleu metric and the sufficient statistics of each scored example, to recompute its
    corpus value on bootstrap resamples exactly as corpus_score would on the resampled lists."""

    metric: BLEU | CHRF
    stats: np.ndarray


def _score_with_references(
    result: MetricsResult, predictions: list[str], references: list[str | None], wanted: list[str], settings
) -> dict[str, _CorpusStats]:
    """Fill result with the reference-based metrics of wanted; returns the sacrebleu statistics for the bootstrap."""
    scored = [i for i, reference in enumerate(references) if reference is not None]
    names = [name for metric in wanted for name in (ROUGE_TYPES if metric == "rouge" else (metric,))]
    if not scored:
        result.unavailable.update({name: NO_REFERENCES for name in names})
        return {}
    if len(scored) < len(references):
        missing = len(references) - len(scored)
        result.notes.append(f"reference-based metrics on {len(scored)} of {len(references)} examples "
                            f"({missing} without a reference answer)")
    hypotheses = [predictions[i] for i in scored]
    targets = [references[i] for i in scored]
    per_scored, corpus_stats = _per_example_scores(result, hypotheses, targets, wanted, settings)
    for name, scores in per_scored.items():
        result.per_example[name] = _spread(scores, scored, len(references))
        result.corpus[name] = float(np.mean(scores))
    for name, entry in corpus_stats.items():
        # BLEU and chrF of a corpus are not means of sentence scores: sacrebleu's corpus_score.
        result.corpus[name] = float(entry.metric.corpus_score(hypotheses, [targets]).score)
    return corpus_stats


def _per_example_scores(
    result: MetricsResult, hypotheses: list[str], targets: list[str], wanted: list[str], settings
) -> tuple[dict[str, list[float]], dict[str, _CorpusStats]]:
    """Per-example scores of the reference-based metrics of wanted, in config order, and the sacrebleu statistics."""
    per_scored, corpus_stats = {}, {}
    for metric in wanted:
        if metric == "exact_match":
            per_scored[metric] = [exact_match(h, t) for h, t in zip(hypotheses, targets)]
        elif metric == "f1":
            per_scored[metric] = [token_f1(h, t) for h, t in zip(hypotheses, targets)]
        elif metric in ("bleu", "chrf"):
            per_scored[metric], corpus_stats[metric] = _sacrebleu_scores(result, metric, hypotheses, targets, settings)
        elif metric == "rouge":
            per_scored.update(_rouge_scores(result, hypotheses, targets, settings.rouge_tokenization))
    return per_scored, corpus_stats


def _spread(scores: list[float], positions: list[int], count: int) -> list[float | None]:
    """count slots holding scores at positions and None elsewhere."""
    spread: list[float | None] = [None] * count
    for position, score in zip(positions, scores):
        spread[position] = float(score)
    return spread


def mostly_chinese(texts: Sequence[str]) -> bool:
    """Whether more than MOSTLY_CHINESE_SHARE of the non-space characters of texts are Han characters."""
    characters = sum(len(text) - sum(ch.isspace() for ch in text) for text in texts)
    han = sum(len(_HAN_CHAR.findall(text)) for text in texts)
    return characters > 0 and han / characters > MOSTLY_CHINESE_SHARE


# --- exact match and token F1 ---------------------------------------------------------------------


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalization, extended to Chinese: NFKC, lowercase, no punctuation (ASCII,
    Unicode and full-width), no English articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not _is_punctuation(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@lru_cache(maxsize=4096)
def _is_punctuation(ch: str) -> bool:
    # string.punctuation holds symbols too ($, +, <, ...), which SQuAD removes; Unicode P* adds 。、《》“”.
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def answer_tokens(text: str) -> list[str]:
    """Tokens of the normalized answer: English words split on spaces, each Han character its own token."""
    return _ANSWER_TOKEN.findall(squad_normalize(text))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized answers have the same tokens (so spaces between Han characters don't count), else 0.0."""
    return float(answer_tokens(prediction) == answer_tokens(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD F1 of the token multisets; two empty answers score 1.0, one empty answer 0.0."""
    predicted, expected = answer_tokens(prediction), answer_tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


# --- BLEU, chrF, ROUGE ----------------------------------------------------------------------------


def _sacrebleu_scores(
    result: MetricsResult, name: str, hypotheses: list[str], targets: list[str], settings
) -> tuple[list[float], _CorpusStats]:
    """Per-example sentence scores (as sacrebleu's sentence_bleu/sentence_chrf) and the corpus statistics."""
    if name == "bleu":
        tokenize = _bleu_tokenize(result, settings.bleu_tokenize, targets)
        corpus_metric, sentence_metric = BLEU(tokenize=tokenize), BLEU(tokenize=tokenize, effective_order=True)
    else:
        corpus_metric = sentence_metric = CHRF()
    per_example = [sentence_metric.sentence_score(h, [t]).score for h, t in zip(hypotheses, targets)]
    # The same private pair sacrebleu's own paired bootstrap (sacrebleu.significance) uses.
    stats = np.array(corpus_metric._extract_corpus_statistics(hypotheses, [targets]), dtype=np.int64)
    return per_example, _CorpusStats(corpus_metric, stats)


def _bleu_tokenize(result: MetricsResult, setting: str, targets: list[str]) -> str:
    if setting != "auto":
        result.notes.append(f"BLEU tokenize={setting} (eval.bleu_tokenize)")
        return setting
    if mostly_chinese(targets):
        result.notes.append("BLEU tokenize=zh (references mostly Chinese)")
        return "zh"
    result.notes.append("BLEU tokenize=13a (references not mostly Chinese)")
    return "13a"


class ChineseCharTokenizer:
    """A rouge-score tokenizer for Chinese: each Han character a token, runs of other letters and
    digits one token each, lowercased, punctuation dropped. (rouge-score's default tokenizer keeps
    only a-z and 0-9, so it drops Chinese entirely.)"""

    def tokenize(self, text: str) -> list[str]:
        return _ROUGE_CHAR_TOKEN.findall(text.lower())


def _rouge_scores(
    result: MetricsResult, hypotheses: list[str], targets: list[str], setting: str
) -> dict[str, list[float]]:
    """rouge1/rouge2/rougeL F-measure of each example, on characters or words as setting says."""
    by_char = setting == "char" or (setting == "auto" and mostly_chinese(targets))
    units = "characters" if by_char else "words"
    why = "eval.rouge_tokenization" if setting != "auto" else (
        "references mostly Chinese" if by_char else "references not mostly Chinese")
    result.notes.append(f"ROUGE on {units} ({why})")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=ChineseCharTokenizer() if by_char else None)
    scores = [scorer.score(target, hypothesis) for hypothesis, target in zip(hypotheses, targets)]
    return {rouge_type: [score[rouge_type].fmeasure for score in scores] for rouge_type in ROUGE_TYPES}


# --- semantic similarity --------------------------------------------------------------------------


def _score_semantic_similarity(
    result: MetricsResult, predictions: Sequence[str], references: Sequence[str | None], model_path: str | None
) -> None:
    if model_path is None:
        result.unavailable["semantic_similarity"] = "eval.embedding_model not set"
        return
    scored = [i for i, reference in enumerate(references) if reference is not None]
    if not scored:
        result.unavailable["semantic_similarity"] = NO_REFERENCES
        return
    similarities = embedding_similarities(model_path, [predictions[i] for i in scored], [references[i] for i in scored])
    result.per_example["semantic_similarity"] = _spread(similarities, scored, len(references))
    result.corpus["semantic_similarity"] = float(np.mean(similarities))


def embedding_similarities(model_path: str, texts_a: Sequence[str], texts_b: Sequence[str]) -> list[float]:
    """Cosine similarity of the mean-pooled last hidden states of each pair (texts_a[i], texts_b[i]).

    model_path is a local HF-format encoder directory; raises DsftError naming eval.embedding_model
    when it is missing or cannot be loaded.
    """
    import torch

    tokenizer, model = _load_embedding_model(model_path)
    vectors_a, vectors_b = _embed(texts_a, tokenizer, model), _embed(texts_b, tokenizer, model)
    return torch.nn.functional.cosine_similarity(vectors_a, vectors_b, dim=-1).tolist()


def _load_embedding_model(model_path: str):
    from transformers import AutoModel, AutoTokenizer

    if not Path(model_path).is_dir():
        raise DsftError(f"eval.embedding_model: {model_path} is not a directory; "
                        "expected a local HF-format encoder (config.json, weights and tokenizer files)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModel.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise DsftError(f"eval.embedding_model: cannot load {model_path}: {exc}") from None
    if tokenizer.pad_token is None:
        # Padding only fills the batch; the attention mask keeps pad tokens out of the mean.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer, model.eval()


def _embed(texts: Sequence[str], tokenizer, model):
    """Mean over the attention mask of the last hidden state: one float32 vector per text, [N, hidden]."""
    import torch

    max_length_tokens = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))
    vectors = []
    for start in range(0, len(texts), EMBEDDING_BATCH_SIZE):
        batch = tokenizer(list(texts[start : start + EMBEDDING_BATCH_SIZE]), padding=True, truncation=True,
                          max_length=max_length_tokens, return_tensors="pt")
        with torch.no_grad():
            hidden_BLD = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask_BL1 = batch["attention_mask"].unsqueeze(-1).to(hidden_BLD.dtype)
        vectors.append((hidden_BLD * mask_BL1).sum(1) / mask_BL1.sum(1).clamp(min=1))
    return torch.cat(vectors).float()


# --- checks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A loaded custom check: function(answer, reference, prompt) -> bool | number."""

    name: str
    key: str
    """Its config key, for errors: eval.checks[i]."""
    function: Callable[[str, str | None, str], object]


def load_checks(checks: Sequence[CheckConfig], reserved: Collection[str] = ()) -> list[Check]:
    """Compile the regexes and import the functions of checks; raises DsftError naming eval.checks[i]
    for a bad regex, a function that cannot be loaded, or a name that is taken (reserved or repeated)."""
    loaded: list[Check] = []
    for i, check in enumerate(checks):
        key = f"eval.checks[{i}]"
        if check.name in reserved or any(other.name == check.name for other in loaded):
            raise DsftError(f"{key}.name: {check.name!r} is already a metric name; give the check another name")
        if check.regex is not None:
            function = _regex_check(check.regex, key)
        else:
            function = load_function(check.python, f"{key}.python")
        loaded.append(Check(check.name, key, function))
    return loaded


def _regex_check(pattern: str, key: str) -> Callable[[str, str | None, str], bool]:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise DsftError(f"{key}.regex: not a valid Python regular expression: {exc}") from None
    return lambda answer, reference, prompt: compiled.search(answer) is not None


def _score_check(
    result: MetricsResult, check: Check, predictions: Sequence[str], references: Sequence[str | None],
    prompts: Sequence[str],
) -> None:
    if not predictions:
        result.unavailable[check.name] = "there are no examples"
        return
    scores = [_run_check(check, i, *args) for i, args in enumerate(zip(predictions, references, prompts))]
    result.per_example[check.name] = scores
    result.corpus[check.name] = float(np.mean(scores))


def _run_check(check: Check, index: int, answer: str, reference: str | None, prompt: str) -> float:
    try:
        value = check.function(answer, reference, prompt)
    except Exception as exc:  # a failing user function is a user error, shown without our traceback
        raise DsftError(f"{check.key} ({check.name}) raised {type(exc).__name__} on example {index}: {exc}") from None
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise DsftError(f"{check.key} ({check.name}) returned {type(value).__name__} on example {index}; "
                    "expected a bool or a number")


# --- bootstrap ------------------------------------------------------------------------------------


def _add_intervals(
    result: MetricsResult, corpus_stats: dict[str, _CorpusStats], resamples: int, confidence: float, seed: int
) -> None:
    """Percentile-bootstrap interval of every corpus value: corpus-level metrics are recomputed on each
    resample, the others are means of the resampled per-example scores."""
    if resamples == 0:
        return
    tail_percent = 100 * (1 - confidence) / 2
    for name in result.corpus:
        if name in corpus_stats:
            values = _resampled_corpus_scores(corpus_stats[name], resamples, seed)
        else:
            scores = np.array([score for score in result.per_example[name] if score is not None], dtype=np.float64)
            values = [scores[indices].mean() for indices in resample_indices(len(scores), resamples, seed)]
        low, high = np.percentile(values, [tail_percent, 100 - tail_percent])
        result.ci[name] = (float(low), float(high))


def resample_indices(count: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples of range(count), each count indices drawn with replacement.

    A fresh numpy Generator(seed) per call: every metric over the same examples gets the same
    resamples (paired), and a metric's interval does not depend on which other metrics ran.
    """
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield rng.integers(0, count, size=count)


def _resampled_corpus_scores(entry: _CorpusStats, resamples: int, seed: int) -> list[float]:
    count = len(entry.stats)
    values = []
    for indices in resample_indices(count, resamples, seed):
        # Summed integer statistics are exactly those of corpus_score on the resampled lists.
        summed = (np.bincount(indices, minlength=count) @ entry.stats).tolist()
        values.append(entry.metric._compute_score_from_stats(summed).score)
    return values
