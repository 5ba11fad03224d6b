"""A reward run (stage reward) as a reward function: rewards = load_reward_model(run_dir)(prompts, completions).

Contract (what GRPO/PPO's `kind: reward_model` reward relies on):

- load_reward_model(run_dir, device=None, dtype="auto", batch_size=16) -> RewardModel. Raises DsftError when
  run_dir is not a dsft run directory of stage reward, and as dsft.models.load.load_run does (safetensors only).
- RewardModel(prompts, completions) -> list[float], one score per completion, in order:
  - prompts[i] is the prompt of completions[i]: a conversation (a sequence of dsft.data.formats.Message: an
    optional system message, ending with the user turn answered), or the token ids of a prompt already rendered
    with this reward model's tokenizer and template (RewardModel.prompt_ids(messages) gives them; ids are only
    accepted with the built-in templates deepseek_v3 / deepseek_r1, whose answer rendering needs no history).
    Token ids of another model's tokenizer (e.g. a policy's) are not valid: pass messages instead.
  - completions[i] is the assistant's reply as generated after the prompt and decoded (what `dsft generate`
    prints: reasoning, if any, up to </think>, then the answer; no end-of-sentence token).
  - Each pair is rendered as the reward model's training pairs were: the prompt through render_prompt, the
    reply as the final assistant turn (reasoning split off at </think>) with its end-of-turn text, then cut to
    the run's data.max_length_tokens (the start is kept).
  - A score is the head's output at the last token: higher is preferred; under the Bradley-Terry training loss
    P(a preferred to b) = sigmoid(r_a - r_b). Only differences are meaningful, the offset is arbitrary (unless
    the run set reward.center_rewards_coefficient, which keeps scores near 0).
  - Runs without gradients, in batches of batch_size, on the model's device. Raises ValueError when prompts and
    completions differ in length, DsftError for token-id prompts with a tokenizer template.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dsft.data.chat import render_prompt
from dsft.data.encode import encode_segments
from dsft.data.formats import Message
from dsft.data.preference_data import encode_answer
from dsft.errors import DsftError
from dsft.models.generate import split_reasoning

Prompt = Sequence[Message] | Sequence[int]
BUILTIN_TEMPLATES = ("deepseek_v3", "deepseek_r1")


class RewardModel:
    """A loaded reward model: call it with prompts and completions for their scores (see the module docstring)."""

    def __init__(self, model, tokenizer, template: str, max_length_tokens: int, batch_size: int = 16):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        """The chat template the run trained with (config.yaml data.chat_template, resolved)."""
        self.max_length_tokens = max_length_tokens
        self.batch_size = batch_size

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; give one prompt per completion")
        sequences = [self.sequence_ids(prompt, completion) for prompt, completion in zip(prompts, completions)]
        return self.score_ids(sequences)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a conversation's prompt in this model's tokenizer and template, as training rendered it."""
        ids, _ = encode_segments(render_prompt(messages, self.template, self.tokenizer), self.tokenizer)
        return ids

    def sequence_ids(self, prompt: Prompt, completion: str) -> list[int]:
        """Token ids the model scores for one completion: the rendered prompt and reply, cut to max_length_tokens."""
        reasoning, answer = split_reasoning(completion)
        reply = Message("assistant", answer, reasoning)
        if _is_token_ids(prompt):
            if self.template not in BUILTIN_TEMPLATES:
                raise DsftError(f"token-id prompts need a built-in chat template ({', '.join(BUILTIN_TEMPLATES)}); "
                                f"this reward model renders with {self.template!r}: pass the prompts as messages")
            # A built-in template renders the final answer the same after any history.
            prompt_ids, (_, answer_ids) = list(prompt), encode_answer((), reply, self.template, self.tokenizer)
        else:
            prompt_ids, answer_ids = encode_answer(prompt, reply, self.template, self.tokenizer)
        return (prompt_ids + answer_ids)[: self.max_length_tokens]

    def score_ids(self, sequences: Sequence[list[int]]) -> list[float]:
        """Scores of token-id sequences (each prompt + reply), right-padded in batches of batch_size."""
        import torch

        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            batch = sequences[start : start + self.batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, : len(ids)] = 1
            with torch.no_grad():
                logits_B1 = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            scores += logits_B1[:, 0].float().tolist()
        return scores


def _is_token_ids(prompt: Prompt) -> bool:
    return len(prompt) > 0 and isinstance(prompt[0], int)


def load_reward_model(run_dir: str | Path, device: str | None = None, dtype: str = "auto", batch_size: int = 16) -> RewardModel:
    """The reward run in run_dir as a RewardModel on device (default: cuda when available, else cpu).

    Raises DsftError when run_dir is not a run of stage reward, and as load_run does.
    """
    import torch

    from dsft.models.load import load_run

    model, tokenizer, config = load_run(run_dir, dtype)
    if config.stage != "reward":
        raise DsftError(f"{run_dir}: a run of stage {config.stage!r}, not a reward model (stage reward)")
    model.to(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return RewardModel(model, tokenizer, config.data.chat_template, config.data.max_length_tokens, batch_size)
