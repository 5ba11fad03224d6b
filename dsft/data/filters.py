"""Record filters of `dsft data prepare`: length, language, heuristic quality and a user classifier.

Each `*_reason` function returns None to keep a record, or a short reason string that the
prepare report counts ("too_few_tokens", "language", "repetition", ...). The ratio helpers are
public so the report and tests can show the numbers a decision was made on.
"""

from __future__ import annotations

import math
import re
import unicodedata

from dsft.data.prepare_config import ClassifierFilterStep, LanguageFilterStep, LengthFilterStep, QualityFilterStep
from dsft.errors import DsftError

HAN_RANGES = (
    (0x3400, 0x4DBF),  # extension A
    (0x4E00, 0x9FFF),  # unified ideographs
    (0xF900, 0xFAFF),  # compatibility ideographs
    (0x20000, 0x2EBEF),  # extensions B-F
    (0x30000, 0x323AF),  # extensions G-H
)
REPETITION_NGRAM = 3
REPETITION_MIN_UNITS = 10
"""Texts with fewer words (or CJK characters) score 0: a few repeated words in a short answer are normal."""
WORD_PATTERN = re.compile(r"\w+")


def length_reason(token_count: int, step: LengthFilterStep) -> str | None:
    """'too_few_tokens' below step.min_tokens, 'too_many_tokens' above step.max_tokens (when set), else None."""
    if token_count < step.min_tokens:
        return "too_few_tokens"
    if step.max_tokens is not None and token_count > step.max_tokens:
        return "too_many_tokens"
    return None


# Character classes as regexes: counting with findall runs in C, a loop over characters does not
# (this filter sees every record of the data).
HAN_PATTERN = re.compile("[" + "".join(f"{chr(low)}-{chr(high)}" for low, high in HAN_RANGES) + "]")
LATIN_PATTERN = re.compile("[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff\uff21-\uff3a\uff41-\uff5a]")
LETTER_PATTERN = re.compile(r"[^\W\d_]")


def is_han(char: str) -> bool:
    """True for a Han (Chinese) ideograph."""
    return HAN_PATTERN.match(char) is not None


def is_latin(char: str) -> bool:
    """True for a Latin-script letter (a-z, accented letters, full-width Latin)."""
    return LATIN_PATTERN.match(char) is not None


def language_shares(text: str) -> dict[str, float]:
    """{'zh': share of letters in Han script, 'en': share in Latin script}; both 0.0 without letters.

    Letters are the characters str.isalpha() accepts (Han ideographs included); kana, Cyrillic, ...
    count as letters of neither language.
    """
    letter_count = len(LETTER_PATTERN.findall(text))
    if not letter_count:
        return {"zh": 0.0, "en": 0.0}
    han_count = len(HAN_PATTERN.findall(text))
    latin_count = len(LATIN_PATTERN.findall(text))
    return {"zh": han_count / letter_count, "en": latin_count / letter_count}


def language_reason(text: str, step: LanguageFilterStep) -> str | None:
    """'language' unless one of step.languages holds at least step.min_share of the letters.

    Texts without any letter (numbers, code symbols) are kept: there is no language to judge.
    """
    if not any(char.isalpha() for char in text):
        return None
    shares = language_shares(text)
    if any(shares[language] >= step.min_share for language in step.languages):
        return None
    return "language"


def repetition_units(text: str) -> list[str]:
    """Words (case-folded, punctuation dropped) of Latin text; non-space characters of CJK-majority text."""
    if language_shares(text)["zh"] > 0.5:
        # Chinese has no spaces between words, so characters stand in for words.
        return [char for char in text if not char.isspace()]
    return WORD_PATTERN.findall(text.casefold())


def repetition_ratio(text: str) -> float:
    """Share of 3-gram occurrences that repeat an earlier one: (total - distinct) / total.

    A text written twice over scores about 0.5. Texts under REPETITION_MIN_UNITS units score 0.0.
    """
    units = repetition_units(text)
    if len(units) < REPETITION_MIN_UNITS:
        return 0.0
    ngrams = [tuple(units[i:i + REPETITION_NGRAM]) for i in range(len(units) - REPETITION_NGRAM + 1)]
    return (len(ngrams) - len(set(ngrams))) / len(ngrams)


def _combining_marks() -> str:
    return "".join(re.escape(chr(c)) for c in range(0x10000) if unicodedata.category(chr(c)).startswith("M"))


# Symbols: neither word characters (letters, digits, Han), whitespace, nor combining marks, which
# belong to the letter before them; "_" is a word character to the regex but a symbol here.
SYMBOL_PATTERN = re.compile(f"[^\\w\\s{_combining_marks()}]|_")
WHITESPACE_PATTERN = re.compile(r"\s")


def symbol_ratio(text: str) -> float:
    """Share of non-whitespace characters that are neither letters, digits nor CJK; 0.0 for blank text.

    Punctuation, Chinese punctuation included, counts as symbols.
    """
    visible_count = len(text) - len(WHITESPACE_PATTERN.findall(text))
    if not visible_count:
        return 0.0
    return len(SYMBOL_PATTERN.findall(text)) / visible_count


def quality_reason(text: str, answer: str | None, step: QualityFilterStep) -> str | None:
    """'repetition', 'symbols' or 'short_answer' (checked in this order), else None.

    text is all text of the record; answer is its answer (None for text records: no answer check).
    A ratio equal to its maximum is kept. Answer length counts characters without surrounding whitespace.
    """
    if repetition_ratio(text) > step.max_repetition_ratio:
        return "repetition"
    if symbol_ratio(text) > step.max_symbol_ratio:
        return "symbols"
    if answer is not None and len(answer.strip()) < step.min_answer_chars:
        return "short_answer"
    return None


def classifier_reason(score: float, step: ClassifierFilterStep) -> str | None:
    """'classifier_score' when score < step.min_score, else None.

    Raises DsftError naming steps[].filter_classifier.function when score is not a number in [0, 1].
    """
    valid = isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)
    if not valid or not 0.0 <= score <= 1.0:
        raise DsftError(
            f"steps[].filter_classifier.function ({step.function}) returned {score!r}; "
            "it must return a float in [0, 1]"
        )
    return "classifier_score" if score < step.min_score else None
