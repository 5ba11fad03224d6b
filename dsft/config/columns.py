"""data.columns and data.tags: reading a dataset whose fields have other names, without converting it.

columns maps a field dsft reads (`output`) to the name it has in the file (`answer`); tags names the keys and role
values inside each conversation turn, with the names of LLaMA-Factory's dataset_info `tags` block so that block can
be pasted as it is. The renaming itself is dsft/data/columns.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from dsft.config.base import Section

RecordField = Literal[
    "instruction", "input", "output", "system", "history", "messages", "conversations", "text", "tools",
    "thinking", "label", "prompt", "completion", "chosen", "rejected",
]
"""The top-level fields dsft's record readers take (README "Data formats" says which layout reads which)."""


class TagsConfig(Section):
    role_tag: str | None = None
    """The key of each turn that holds its role; dsft reads role (messages lists) or from (conversations)."""
    content_tag: str | None = None
    """The key of each turn that holds its text; dsft reads content (messages lists) or value (conversations)."""
    user_tag: str | None = None
    """The role value of the user's turns (read as user)."""
    assistant_tag: str | None = None
    """The role value of the assistant's turns (read as assistant)."""
    system_tag: str | None = None
    """The role value of a system turn (read as system)."""
    observation_tag: str | None = None
    """The role value of a tool's result (read as tool in messages lists, observation in conversations)."""
    function_tag: str | None = None
    """The role value of the assistant's tool calls as JSON (sharegpt's function_call; conversations only)."""

    def any_set(self) -> bool:
        """Whether any key or role value is renamed."""
        return any(value is not None for value in self.model_dump().values())

    def role_values(self) -> dict[str, str]:
        """{value in the file: the role dsft's sharegpt reader takes} for the role tags set."""
        named = {self.user_tag: "user", self.assistant_tag: "assistant", self.system_tag: "system",
                 self.observation_tag: "observation", self.function_tag: "function_call"}
        return {value: role for value, role in named.items() if value is not None}

    @field_validator("*")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("must not be empty; leave the tag out to keep dsft's own name")
        return value


LLAMA_FACTORY_COLUMNS = {"query": "input", "response": "output", "kto_tag": "label"}
"""LLaMA-Factory's dataset_info column names that dsft calls otherwise (its prompt is dsft's instruction in alpaca
records; dsft's prompt is the prompt of a preference or KTO record)."""


def refuse_foreign_columns(columns: object) -> object:
    """A mode="before" check: LLaMA-Factory's column names and media columns get a ValueError saying what to write."""
    if not isinstance(columns, dict):
        return columns
    for key in columns:
        if key in LLAMA_FACTORY_COLUMNS:
            raise ValueError(f"{key} is LLaMA-Factory's name; dsft reads it as {LLAMA_FACTORY_COLUMNS[key]}: "
                             f"write {LLAMA_FACTORY_COLUMNS[key]}: {columns[key]}")
        if key in ("images", "videos", "audios"):
            raise ValueError(f"{key}: dsft trains text models only, so records with media are refused")
    return columns


def check_columns(columns: dict[str, str]) -> dict[str, str]:
    """columns with each file field named once and not empty; a ValueError names the clash."""
    by_file: dict[str, list[str]] = {}
    for dsft_name, file_name in columns.items():
        if not file_name:
            raise ValueError(f"{dsft_name}: the file's field name must not be empty")
        by_file.setdefault(file_name, []).append(dsft_name)
    clashes = [f"{file_name} is given for {' and '.join(names)}" for file_name, names in by_file.items() if len(names) > 1]
    if clashes:
        raise ValueError(f"each file field is read as one dsft field: {'; '.join(clashes)}")
    return columns
