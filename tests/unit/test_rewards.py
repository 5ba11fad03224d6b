"""Each reward kind on hand-made completions, the weighted hybrid with its components apart, and config errors."""

import pytest

from dsft.config import RewardFunctionConfig
from dsft.data.formats import Message
from dsft.data.prompts import RlPrompt
from dsft.errors import DsftError
from dsft.train.rewards import (
    Completions,
    accuracy,
    build_rewards,
    consecutive_groups,
    diversity,
    efficiency,
    format_reward,
    score,
)


def batch(texts, references=None, lengths=None, groups=None):
    n = len(texts)
    prompts = [RlPrompt((Message("user", "q"),), reference, "<｜User｜>q<｜Assistant｜>", (1, 2))
               for reference in references or [None] * n]
    return Completions(texts, prompts, lengths or [1] * n, groups or [0] * n)


def test_accuracy_uses_dsft_evals_answer_normalization():
    assert accuracy("  42000. ", "42000") == 1.0
    assert accuracy("The Paris", "paris") == 1.0  # case and articles
    assert accuracy("四 十", "四十") == 1.0  # spaces between Han characters do not count
    assert accuracy("<think>37 x 1000</think>\n\n37000", "37000") == 1.0  # reasoning removed
    assert accuracy("reasoning only\n</think>\n\n37000", "37000") == 1.0  # the R1 prompt opened the block
    assert accuracy("4200", "42000") == 0.0
    assert accuracy("42000", None) is None  # no reference: the component does not apply


def test_format_rewards_a_thinking_block_followed_by_an_answer():
    assert format_reward("<think>2 + 2</think> 4", "prompt") == 1.0
    assert format_reward("\n<think>\nstep\n</think>\n\nfour", "prompt") == 1.0
    assert format_reward("<think>2 + 2</think>", "prompt") == 0.0  # missing answer
    assert format_reward("<think>2 + 2</think>   \n", "prompt") == 0.0
    assert format_reward("4", "prompt") == 0.0  # no thinking block
    assert format_reward("<think>a</think> b <think>c</think> d", "prompt") == 0.0  # one block only
    # The deepseek_r1 template ends the prompt with "<think>\n": the completion continues inside the block.
    assert format_reward("2 + 2\n</think>\n\n4", "<｜Assistant｜><think>\n") == 1.0
    assert format_reward("4", "<｜Assistant｜><think>\n") == 0.0


def test_diversity_is_the_share_of_bigrams_no_other_group_member_has():
    # "x y z" -> (^ x) (x y) (y z) (z $); "x y w" shares (^ x) (x y): 2 of 4 are its own.
    assert diversity(["x y z", "x y w"], [0, 0]) == [0.5, 0.5]
    # Identical answers have nothing of their own; a one-word answer still has two bigrams, (^ 7) (7 $).
    assert diversity(["42000", "42000", "4200"], [0, 0, 0]) == [0.0, 0.0, 1.0]
    # Other groups do not count.
    assert diversity(["42000", "42000"], [0, 1]) == [1.0, 1.0]


def test_efficiency_counts_tokens_against_the_budget():
    assert [efficiency(n, 8) for n in (0, 4, 8, 10)] == [1.0, 0.5, 0.0, 0.0]


def test_regex_matches_anywhere_in_the_completion_as_generated():
    (component,) = build_rewards([RewardFunctionConfig(kind="regex", pattern=r"^\d+$")], "grpo.rewards", 8)
    assert component.name == "regex" and component.score(batch(["123", "12a", " 12"])) == [1.0, 0.0, 0.0]


def test_hybrid_reward_is_the_weighted_sum_with_each_component_reported():
    configs = [RewardFunctionConfig(kind="accuracy", weight=0.6), RewardFunctionConfig(kind="diversity", weight=0.3),
               RewardFunctionConfig(kind="efficiency", weight=0.1)]
    components = build_rewards(configs, "grpo.rewards", max_new_tokens=8)
    completions = batch(["42000", "42000", "4200", "7"], references=["42000", "42000", "42000", None],
                        lengths=[6, 6, 5, 2], groups=[0, 0, 0, 1])
    rewards = score(components, completions)
    assert rewards.by_name == {"accuracy": [1.0, 1.0, 0.0, None], "diversity": [0.0, 0.0, 1.0, 1.0],
                               "efficiency": [0.25, 0.25, 0.375, 0.75]}
    # accuracy None (no reference) adds nothing: 0.3 x 1 + 0.1 x 0.75 for the last one.
    assert rewards.totals == pytest.approx([0.625, 0.625, 0.3375, 0.375])


def test_python_reward_calls_the_users_function(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def length_match(completion, reference, prompt):\n"
                    "    return float(len(completion) == len(reference)) + (prompt == 'q')\n"
                    "def broken(completion, reference, prompt):\n    raise KeyError('x')\n"
                    "def wrong_type(completion, reference, prompt):\n    return 'high'\n", encoding="utf-8")
    (component,) = build_rewards([RewardFunctionConfig(kind="python", function=f"{path}:length_match", name="lm")],
                                 "ppo.rewards", 8)
    assert component.score(batch(["abc", "ab"], references=["xyz", "xyz"])) == [2.0, 1.0]
    for name, message in (("broken", "raised KeyError on completion 0"), ("wrong_type", "returned str on completion 0")):
        (bad,) = build_rewards([RewardFunctionConfig(kind="python", function=f"{path}:{name}")], "ppo.rewards", 8)
        with pytest.raises(DsftError, match=rf"ppo.rewards\[0\].function {message}"):
            bad.score(batch(["a"], references=["b"]))


def test_config_errors_name_the_key():
    with pytest.raises(DsftError, match=r"grpo.rewards\[1\].name: 'accuracy' names two components"):
        build_rewards([RewardFunctionConfig(kind="accuracy"), RewardFunctionConfig(kind="accuracy")], "grpo.rewards", 8)
    with pytest.raises(DsftError, match=r"grpo.rewards\[0\].pattern: not a valid Python regular expression"):
        build_rewards([RewardFunctionConfig(kind="regex", pattern="(")], "grpo.rewards", 8)
    with pytest.raises(DsftError, match=r"grpo.rewards\[0\].function: file not found"):
        build_rewards([RewardFunctionConfig(kind="python", function="missing.py:f")], "grpo.rewards", 8)
    with pytest.raises(DsftError, match="at least one"):
        build_rewards([], "grpo.rewards", 8)


def test_groups_are_runs_of_the_same_prompt_cut_at_the_group_size():
    assert consecutive_groups(["p", "p", "q", "q", "p", "p"], 2) == [0, 0, 1, 1, 2, 2]
    assert consecutive_groups(["p"] * 4, 2) == [0, 0, 1, 1]


def test_reward_model_scores_the_prompt_messages_and_completions(monkeypatch):
    # The reward run's own contract (dsft.models.reward): model(prompts as messages, completions) -> scores.
    reward_module = pytest.importorskip("dsft.models.reward")
    calls = []

    def load_reward_model(run_dir):
        calls.append(run_dir)
        return lambda prompts, completions: [len(c) + 10 * len(p) for p, c in zip(prompts, completions)]

    monkeypatch.setattr(reward_module, "load_reward_model", load_reward_model)
    (component,) = build_rewards([RewardFunctionConfig(kind="reward_model", model="runs/rm", name="rm")], "grpo.rewards", 8)
    assert calls == ["runs/rm"]  # loaded once, when the components are built
    assert component.score(batch(["abc", "a"])) == [13.0, 11.0]


def test_a_reward_model_that_cannot_be_loaded_names_the_key(tmp_path):
    pytest.importorskip("dsft.models.reward")
    with pytest.raises(DsftError, match=r"grpo.rewards\[0\].model: .*not a dsft run directory"):
        build_rewards([RewardFunctionConfig(kind="reward_model", model=str(tmp_path))], "grpo.rewards", 8)
