"""Which transformers Auto class holds a task's model: the preset builder and the loaders share it."""

from __future__ import annotations

HEAD_TASKS = ("classification", "token_classification")
"""Tasks whose model is a backbone with a classification head "score" (labels in config.json id2label)."""


def auto_model_class(task: str):
    """AutoModelForSequenceClassification for task classification, AutoModelForTokenClassification for
    token_classification, else AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    heads = {"classification": AutoModelForSequenceClassification, "token_classification": AutoModelForTokenClassification}
    return heads.get(task, AutoModelForCausalLM)
