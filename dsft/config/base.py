"""What every config section shares: unknown keys are errors, each field's docstring is its description, and an
assignment is validated as a load is."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


def as_list(value: Any) -> Any:
    """A single string where a list of them is expected (train_files: a.jsonl) becomes that list."""
    return [value] if isinstance(value, str) else value
