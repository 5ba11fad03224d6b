"""Augmented copies of training records (the `augment` train step): EDA-style synonym
replacement, random swaps and random deletion, then an optional back-translation hook.

Units of a text: for Latin text, its whitespace-separated words (rejoined with single spaces);
for mostly Chinese text (more than MOSTLY_CHINESE_SHARE of its non-space characters are Han),
a greedy longest-match segmentation on the synonym dictionary: at each position the longest
dictionary word starting there is one unit, otherwise the single character is. Chinese units are
rejoined with nothing between them. All randomness comes from the rng passed in, so a seed gives
one result.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from dsft.data.fields import prompt_paths, text_paths
from dsft.data.prepare_config import AugmentStep
from dsft.errors import DsftError
from dsft.userfunc import load_function

__all__ = ["augment_record", "augment_text", "load_function", "load_synonyms", "segment_chinese"]

MOSTLY_CHINESE_SHARE = 0.5
"""Text is segmented as Chinese when more than this share of its non-space characters are Han."""
SYNONYMS_KEY = "train_steps.augment.synonyms_file"

_HAN_CHAR = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")


def load_synonyms(path: str | Path, key: str = SYNONYMS_KEY) -> dict[str, list[str]]:
    """The synonym dictionary of a JSON file holding {word: [synonym, ...]}.

    Raises DsftError naming key when the file is missing, is not valid JSON, or is not an object
    of strings to lists of strings.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DsftError(f"{key}: file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DsftError(f"{key}: {path} is not valid JSON: {exc}") from None
    valid = isinstance(data, dict) and all(
        isinstance(word, str) and isinstance(options, list) and all(isinstance(o, str) for o in options)
        for word, options in data.items()
    )
    if not valid:
        raise DsftError(f"{key}: {path} must hold a JSON object of words to lists of synonyms, "
                        'e.g. {"quick": ["fast", "rapid"]}')
    return data


def augment_text(
    text: str, step: AugmentStep, rng: random.Random, synonyms: dict[str, list[str]],
    back_translate: Callable[[str], str] | None,
) -> str:
    """An augmented version of text: each unit with synonyms replaced by a random one with chance
    step.synonym_prob, then step.swap_count swaps of two random units, then each unit deleted with
    chance step.delete_prob (one random unit is kept when all would go), then back_translate(text)
    when given. Text with no units (empty or whitespace) comes back unchanged, without back translation.
    """
    chinese = _is_mostly_chinese(text)
    units = segment_chinese(text, synonyms) if chinese else text.split()
    if not units:
        return text
    units = _replace_synonyms(units, synonyms, step.synonym_prob, rng)
    units = _swap(units, step.swap_count, rng)
    units = _delete(units, step.delete_prob, rng)
    augmented = ("" if chinese else " ").join(units)
    return back_translate(augmented) if back_translate is not None else augmented


def augment_record(
    record: dict, fmt: str, step: AugmentStep, rng: random.Random, synonyms: dict[str, list[str]],
    back_translate: Callable[[str], str] | None,
) -> dict:
    """A copy of record (format fmt) with augment_text on its prompt texts (step.fields "prompt":
    the answer stays exact) or on every text (step.fields "all"), marked record["augmented"] = True."""
    out = json.loads(json.dumps(record))  # a deep copy; raw records are JSON values
    paths = prompt_paths(out, fmt) if step.fields == "prompt" else text_paths(out, fmt)
    for path in paths:
        parent = out
        for part in path[:-1]:
            parent = parent[part]
        parent[path[-1]] = augment_text(parent[path[-1]], step, rng, synonyms, back_translate)
    out["augmented"] = True
    return out


def segment_chinese(text: str, synonyms: dict[str, list[str]]) -> list[str]:
    """Units of text by greedy longest match on the words of synonyms; whitespace is dropped and
    every other character not starting a dictionary word is a unit of its own."""
    longest_word_chars = max((len(word) for word in synonyms), default=1)
    units, position = [], 0
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        length = next((n for n in range(min(longest_word_chars, len(text) - position), 1, -1)
                       if text[position:position + n] in synonyms), 1)
        units.append(text[position:position + length])
        position += length
    return units


def _is_mostly_chinese(text: str) -> bool:
    visible_chars = sum(1 for c in text if not c.isspace())
    return visible_chars > 0 and len(_HAN_CHAR.findall(text)) > MOSTLY_CHINESE_SHARE * visible_chars


def _replace_synonyms(units: list[str], synonyms: dict[str, list[str]], prob: float, rng: random.Random) -> list[str]:
    # Only units with synonyms draw from rng, so adding a word to the text without synonyms
    # does not change what happens to the others.
    return [rng.choice(synonyms[u]) if synonyms.get(u) and rng.random() < prob else u for u in units]


def _swap(units: list[str], swap_count: int, rng: random.Random) -> list[str]:
    units = list(units)
    if len(units) < 2:
        return units
    for _ in range(swap_count):
        i, j = rng.sample(range(len(units)), 2)
        units[i], units[j] = units[j], units[i]
    return units


def _delete(units: list[str], prob: float, rng: random.Random) -> list[str]:
    if prob == 0.0:
        return units
    kept = [u for u in units if rng.random() >= prob]
    return kept if kept else [rng.choice(units)]
