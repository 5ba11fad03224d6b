"""Rename a record's fields to the names dsft reads (data.columns, data.tags), and its errors back to the file's.

The readers in formats.py, preference.py and kto_data.py only know dsft's names; a FieldMap renames each raw record
before they see it, and turns the field paths of their errors back into the file's own names, so that
"field 'messages[2].role'" reads "field 'dialog[2].speaker' (read as 'messages[2].role')" for the user who mapped
them. Renaming builds a new dict: the records read (and the files) are never changed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from dsft.config.columns import TagsConfig
from dsft.data.read import RawRecord
from dsft.errors import DsftError

CONVERSATION_FIELDS = ("messages", "conversations", "prompt", "chosen", "rejected")
"""Fields that hold turns (a list of them, or one turn object for chosen and rejected)."""

_FIELD_PATH = re.compile(r"field '([^']+)'")
_PATH_HEAD = re.compile(r"^([A-Za-z_]\w*)(.*)$", re.DOTALL)
_TURN_KEY = re.compile(r"(\[\d+\]|^)\.(\w+)")


class FieldMap:
    """data.columns and data.tags as a renaming of records; an empty one passes records through as they are."""

    def __init__(self, columns: Mapping[str, str] | None = None, tags: TagsConfig | None = None) -> None:
        self.columns = {dsft: file for dsft, file in (columns or {}).items() if dsft != file}
        self.tags = tags or TagsConfig()
        self._roles = self.tags.role_values()
        self._has_tags = self.tags.any_set()
        self.renames = bool(self.columns) or self._has_tags
        """Whether any field, turn key or role value is renamed."""

    @classmethod
    def of(cls, section) -> FieldMap:
        """The map of a config section with columns and tags (DataConfig, PrepareConfig)."""
        return cls(section.columns, section.tags)

    def apply(self, record: RawRecord) -> RawRecord:
        """record with dsft's field names; raises DsftError when a record holds both names of one field."""
        if not self.renames:
            return record
        data = self._renamed_fields(record)
        if self._has_tags:
            sharegpt = "conversations" in data
            for key in CONVERSATION_FIELDS:
                if isinstance(data.get(key), list):
                    data[key] = [self._turn(turn, record, f"{key}[{i}]", sharegpt) for i, turn in enumerate(data[key])]
                elif isinstance(data.get(key), dict):
                    data[key] = self._turn(data[key], record, key, sharegpt)
        return RawRecord(data, record.source)

    def _renamed_fields(self, record: RawRecord) -> dict:
        original = record.data
        sources = set(self.columns.values())
        for dsft_name, file_name in self.columns.items():
            if file_name in original and dsft_name in original and dsft_name not in sources:
                raise DsftError(f"{record.source}: fields '{file_name}' and '{dsft_name}' are both present, and "
                                f"data.columns reads '{file_name}' as '{dsft_name}'; drop or rename one of them")
        data = {key: value for key, value in original.items() if key not in sources}
        data.update({dsft: original[file] for dsft, file in self.columns.items() if file in original})
        return data

    def _turn(self, turn: object, record: RawRecord, path: str, sharegpt: bool) -> object:
        if not isinstance(turn, dict):
            return turn  # the reader names what is wrong with it
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        renamed = dict(turn)
        for file_key, dsft_key in ((self.tags.role_tag, role_key), (self.tags.content_tag, content_key)):
            if file_key is None or file_key == dsft_key or file_key not in turn:
                continue
            if dsft_key in turn:
                raise DsftError(f"{record.source}: field '{self._file_path(path)}': keys '{file_key}' and '{dsft_key}' "
                                f"are both present, and data.tags reads '{file_key}' as '{dsft_key}'; keep one")
            renamed[dsft_key] = renamed.pop(file_key)
        role = renamed.get(role_key)
        if isinstance(role, str) and role in self._roles:
            renamed[role_key] = self._role(role, sharegpt)
        return renamed

    def _role(self, value: str, sharegpt: bool) -> str:
        role = self._roles[value]
        return "tool" if role == "observation" and not sharegpt else role

    def explain(self, error: DsftError) -> DsftError:
        """error with its field path in the file's names (when the map renamed it); the same error otherwise."""
        if not self.renames:
            return error
        message = str(error)
        match = _FIELD_PATH.search(message)
        if match is None:
            return error
        file_path = self._file_path(match.group(1))
        if file_path == match.group(1):
            return error
        explained = f"field '{file_path}' (read as '{match.group(1)}' through data.columns / data.tags)"
        return DsftError(message[: match.start()] + explained + message[match.end():])

    def _file_path(self, path: str) -> str:
        head = _PATH_HEAD.match(path)
        if head is None:
            return path
        name, rest = head.groups()
        file_name = self.columns.get(name, name)
        if name in CONVERSATION_FIELDS:
            rest = _TURN_KEY.sub(lambda m: m.group(1) + "." + self._file_key(m.group(2)), rest)
        return file_name + rest

    def _file_key(self, key: str) -> str:
        if key in ("role", "from") and self.tags.role_tag:
            return self.tags.role_tag
        if key in ("content", "value") and self.tags.content_tag:
            return self.tags.content_tag
        return key
