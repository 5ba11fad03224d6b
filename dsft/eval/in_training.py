"""Evaluation inside training: at every evaluation step, the metrics the task needs.

The Trainer's eval_loss averages per-batch losses; this adds the token-weighted validation
perplexity and, when eval.generate_files is set, the generation metrics of dsft eval on those
prompts (greedy), written to metrics.jsonl beside the losses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformers import TrainerCallback

from dsft.config import EvalConfig
from dsft.data.dataset import split_prompt_reference
from dsft.data.formats import Example
from dsft.eval.perplexity import perplexity
from dsft.eval.text_metrics import score_generations
from dsft.models.generate import (
    DecodeSettings,
    generate_batch,
    prompt_ids,
    split_reasoning,
)


class EvalMetricsCallback(TrainerCallback):
    def __init__(self, tokenizer, template: str, validation_rows: Sequence[dict], examples: Sequence[Example],
                 settings: EvalConfig, write: Callable[[dict], None], thinking: bool | None = None):
        self.tokenizer = tokenizer
        self.template, self.thinking = template, thinking
        self.validation_rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in validation_rows]
        self.pairs = [split_prompt_reference(example) for example in examples]
        self.settings = settings
        self.write = write

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        record = {"step": state.global_step}
        if self.validation_rows:
            result = perplexity(model, self.validation_rows, self.tokenizer.pad_token_id, args.per_device_eval_batch_size)
            if result is not None:
                record["eval_perplexity"] = result.value
        if self.pairs:
            record.update({f"eval_{name}": value for name, value in self._generation_metrics(model).items()})
        if len(record) > 1:
            self.write(record)

    def _generation_metrics(self, model) -> dict:
        prompts = [prompt_ids(messages, self.template, self.tokenizer, self.thinking) for messages, _ in self.pairs]
        was_training = model.training
        model.eval()
        replies = generate_batch(model, self.tokenizer, prompts, DecodeSettings(max_new_tokens=self.settings.max_new_tokens),
                                 self.settings.batch_size)
        model.train(was_training)
        answers = [split_reasoning(reply)[1] for reply in replies]
        # Intervals are for reports; during training only the values matter.
        settings = self.settings.model_copy(update={"bootstrap_resamples": 0})
        result = score_generations(answers, [reference for _, reference in self.pairs],
                                   [messages[-1].content for messages, _ in self.pairs], settings)
        return result.corpus
