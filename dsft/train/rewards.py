"""Reward functions of the RL stages (grpo, ppo): each config entry becomes one named, weighted component.

A component scores a batch of completions and returns one value per completion (None where it does not
apply, e.g. accuracy without a reference answer). The reward of a completion is the weighted sum of its
components' values; each component is logged on its own (reward_<name>), so a rise in the total can be
traced to what the model learned.

Kinds (RewardFunctionConfig.kind):
- accuracy: 1 when the answer (reasoning removed) equals the reference after dsft eval's SQuAD-style
  normalization (case, punctuation, articles, spaces between Han characters), else 0; None without reference.
- regex: 1 when the pattern matches anywhere in the completion as generated (re.search), else 0.
- format: 1 for "<think>reasoning</think> answer" with a non-empty answer after the one thinking block, else 0;
  when the prompt already opened the block (the deepseek_r1 template ends with "<think>"), the completion
  continues inside it.
- diversity: the share of the completion's word bigrams found in no other completion of its group; the words
  are framed by start and end markers, so a one-word answer has two bigrams (different answers score 1,
  identical ones 0).
- efficiency: 1 - tokens / max_new_tokens (a completion that used the whole budget scores 0).
- reward_model: the score of a dsft reward run (stage reward) for the prompt and completion.
- python: the user's f(completion, reference, prompt) -> float, prompt being the last user message.
"""

from __future__ import annotations

import itertools
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dsft.config import RewardFunctionConfig
from dsft.data.prompts import RlPrompt
from dsft.data.tokenizer import THINK_CLOSE, THINK_OPEN
from dsft.errors import DsftError
from dsft.eval.text_metrics import answer_tokens, exact_match
from dsft.models.generate import split_reasoning
from dsft.userfunc import load_function

_FORMAT = re.compile(rf"\A\s*{re.escape(THINK_OPEN)}(.*?){re.escape(THINK_CLOSE)}\s*(\S.*)\Z", re.DOTALL)
_START, _END = "\x02", "\x03"
"""Word markers around a completion for its bigrams; control characters never appear among answer tokens."""


@dataclass(frozen=True)
class Completions:
    """A batch of sampled completions and what each was sampled for."""

    texts: Sequence[str]
    """The completions as decoded (special tokens removed)."""
    prompts: Sequence[RlPrompt]
    """The prompt of each completion: its messages, rendered text and reference answer."""
    lengths_tokens: Sequence[int]
    """Completion lengths in tokens (the end-of-sequence token included when generated)."""
    group_ids: Sequence[int]
    """Completions with the same id were sampled for the same prompt together (a GRPO group)."""


@dataclass(frozen=True)
class RewardComponent:
    name: str
    """Name in the logs: reward_<name>."""
    weight: float
    score: Callable[[Completions], list[float | None]]
    """One value per completion; None where the component does not apply."""


@dataclass(frozen=True)
class Rewards:
    totals: list[float]
    """Weighted sum of each completion's component values (components that gave None left out)."""
    by_name: dict[str, list[float | None]]
    """Each component's raw (unweighted) values."""


def build_rewards(configs: Sequence[RewardFunctionConfig], key: str, max_new_tokens: int) -> list[RewardComponent]:
    """The components of configs (key is their config path, e.g. "grpo.rewards", for error messages).

    Raises DsftError for an empty list, two components with one name, a regex that does not compile, a
    python function that cannot be loaded and a reward model that cannot be loaded.
    """
    if not configs:
        raise DsftError(f"{key}: list at least one reward component")
    components: list[RewardComponent] = []
    for i, config in enumerate(configs):
        name = config.name if config.name is not None else config.kind
        if any(other.name == name for other in components):
            raise DsftError(f"{key}[{i}].name: {name!r} names two components; give each a distinct name")
        components.append(RewardComponent(name, config.weight, _scorer(config, f"{key}[{i}]", max_new_tokens)))
    return components


def score(components: Sequence[RewardComponent], batch: Completions) -> Rewards:
    """Every component's values and their weighted sum per completion."""
    by_name = {component.name: component.score(batch) for component in components}
    totals = [0.0] * len(batch.texts)
    for component in components:
        for i, value in enumerate(by_name[component.name]):
            if value is not None:
                totals[i] += component.weight * value
    return Rewards(totals, by_name)


def _scorer(config: RewardFunctionConfig, key: str, max_new_tokens: int) -> Callable[[Completions], list]:
    if config.kind == "accuracy":
        return lambda batch: [accuracy(text, p.reference) for text, p in zip(batch.texts, batch.prompts)]
    if config.kind == "regex":
        compiled = _compile(config.pattern, f"{key}.pattern")
        return lambda batch: [float(compiled.search(text) is not None) for text in batch.texts]
    if config.kind == "format":
        return lambda batch: [format_reward(text, p.text) for text, p in zip(batch.texts, batch.prompts)]
    if config.kind == "diversity":
        return lambda batch: diversity(batch.texts, batch.group_ids)
    if config.kind == "efficiency":
        return lambda batch: [efficiency(length, max_new_tokens) for length in batch.lengths_tokens]
    if config.kind == "python":
        return _python_scorer(load_function(config.function, f"{key}.function"), key)
    return _reward_model_scorer(config.model, f"{key}.model")


def accuracy(completion: str, reference: str | None) -> float | None:
    """1.0 when the completion's answer (after any </think>) matches reference as dsft eval's exact match does."""
    if reference is None:
        return None
    return exact_match(split_reasoning(completion)[1], reference)


def format_reward(completion: str, prompt: str) -> float:
    """1.0 for one thinking block followed by a non-empty answer, else 0.0 (see the module docstring)."""
    if prompt.rstrip().endswith(THINK_OPEN):
        completion = THINK_OPEN + completion  # the template opened the block; the completion continues it
    match = _FORMAT.match(completion)
    return float(match is not None and THINK_OPEN not in match.group(2) and THINK_CLOSE not in match.group(2))


def diversity(texts: Sequence[str], group_ids: Sequence[int]) -> list[float]:
    """Per completion: the share of its word bigrams that no other completion of its group contains."""
    bigrams = [_bigrams(text) for text in texts]
    values = []
    for i, own in enumerate(bigrams):
        others = set().union(*(b for j, b in enumerate(bigrams) if j != i and group_ids[j] == group_ids[i]))
        values.append(len(own - others) / len(own))
    return values


def _bigrams(text: str) -> set[tuple[str, str]]:
    words = [_START, *answer_tokens(text), _END]
    return set(itertools.pairwise(words))


def efficiency(length_tokens: int, max_new_tokens: int) -> float:
    """1 - length / max_new_tokens, within [0, 1]."""
    return min(1.0, max(0.0, 1.0 - length_tokens / max_new_tokens))


def _compile(pattern: str, key: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise DsftError(f"{key}: not a valid Python regular expression: {exc}") from None


def _python_scorer(function: Callable, key: str) -> Callable[[Completions], list]:
    def scorer(batch: Completions) -> list[float]:
        return [_call_user(function, key, i, text, p.reference, p.question)
                for i, (text, p) in enumerate(zip(batch.texts, batch.prompts))]

    return scorer


def _call_user(function: Callable, key: str, index: int, completion: str, reference: str | None, prompt: str) -> float:
    try:
        value = function(completion, reference, prompt)
    except Exception as exc:  # noqa: BLE001 - a failing user function is a user error, shown without our traceback
        raise DsftError(f"{key}.function raised {type(exc).__name__} on completion {index}: {exc}") from None
    if isinstance(value, numbers.Real):  # bool included
        return float(value)
    raise DsftError(f"{key}.function returned {type(value).__name__} on completion {index}; expected a number")


def _reward_model_scorer(run_dir: str, key: str) -> Callable[[Completions], list]:
    """Loaded now, so a wrong directory fails before training; scores each (prompt messages, completion) pair
    as the reward run rendered its training pairs (its own tokenizer and template)."""
    from dsft.models.reward import load_reward_model

    try:
        reward_model = load_reward_model(run_dir)
    except DsftError as exc:
        raise DsftError(f"{key}: {exc}") from None
    return lambda batch: [float(x) for x in reward_model([p.messages for p in batch.prompts], list(batch.texts))]


def consecutive_groups(prompts: Sequence[str], group_size: int) -> list[int]:
    """Group ids of a batch laid out as GRPO samples it: runs of at most group_size equal consecutive prompts.

    A run longer than group_size (the same prompt drawn twice in a row) splits into groups of group_size.
    """
    ids: list[int] = []
    run_length = 0
    for i, prompt in enumerate(prompts):
        same_run = i > 0 and prompt == prompts[i - 1] and run_length < group_size
        run_length = run_length + 1 if same_run else 1
        ids.append(ids[-1] if same_run else (ids[-1] + 1 if ids else 0))
    return ids
