"""YAML configs with the run config's rules, for any pydantic model: read, `--set` overrides,
`${NAME}` environment references, and errors naming the key path, its YAML line and what is allowed."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dsft.errors import DsftError

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
MISSING = object()


def invalid(source: str, lines: list[str]) -> DsftError:
    return DsftError(f"invalid config {source}:\n" + "\n".join(f"  - {line}" for line in lines))


def expand_env_references(raw: Any) -> tuple[Any, dict[tuple, str], list[tuple[tuple, str]]]:
    """Replace ${NAME} and ${NAME:-default} in every string of raw by the environment's values.

    Returns the expanded copy, key path -> original text of each string that had a reference, and
    (key path, problem) for each malformed reference and each variable that is not set and has no default.
    As in the shell, a default also replaces a variable that is set but empty.
    """
    references: dict[tuple, str] = {}
    problems: list[tuple[tuple, str]] = []

    def walk(node: Any, path: tuple) -> Any:
        if isinstance(node, dict):
            return {key: walk(value, (*path, key)) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value, (*path, i)) for i, value in enumerate(node)]
        if not (isinstance(node, str) and "${" in node):
            return node
        references[path] = node
        try:
            return _expand(node)
        except ValueError as exc:
            problems.append((path, str(exc)))
            return node

    return walk(raw, ()), references, problems


def _expand(text: str) -> str:
    if "${" in _ENV_REFERENCE.sub("", text):
        raise ValueError("malformed environment reference; write ${NAME} or ${NAME:-default} (NAME: letters, digits, _)")

    def value_of(match: re.Match) -> str:
        name, default = match.groups()
        value = os.environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            raise ValueError(f"environment variable {name} is not set; set it, or write ${{{name}:-default}}")
        return value

    return _ENV_REFERENCE.sub(value_of, text)


def apply_override(raw: dict, override: str) -> None:
    """Apply one `key.path=value` override in place; the value is parsed as YAML (1e-4, true, [a, b])."""
    key, sep, value_text = override.partition("=")
    if not sep or not key.strip():
        raise DsftError(f"--set {override!r}: expected key.path=value, e.g. train.learning_rate=1e-4")
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):  # an entry of a list by its index, e.g. stages.0.train.max_steps
            if not (part.isdigit() and int(part) < len(node)):
                raise DsftError(f"--set {override!r}: {where}: {'.'.join(parts[:i])} has entries 0 to {len(node) - 1}")
            part = int(part)
        elif not isinstance(node, dict):
            raise DsftError(f"--set {override!r}: {'.'.join(parts[:i])} is a value, not a section")
        if i == len(parts) - 1:
            break
        node = node[part] if isinstance(node, list) else node.setdefault(part, {})
    try:
        node[part] = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        node[part] = value_text


def lookup(node: Any, path: tuple) -> Any:
    """The value at a key path (dict keys and list indexes) of a dumped config, or MISSING."""
    for part in path:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return MISSING
    return node


def assign(node: Any, path: tuple, value: Any) -> None:
    """Set the value at a key path that lookup finds."""
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def read_text(path: Path) -> str:
    if not path.is_file():
        raise DsftError(f"config file not found: {path}")
    return path.read_text(encoding="utf-8")


def parse_yaml(text: str, path: Path) -> dict:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise DsftError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DsftError(f"{path}: the config must be a mapping with sections model, data, method, train, eval, output")
    return raw


def describe(err: dict, yaml_text: str | None, root: type[BaseModel], secret_keys: tuple = (),
             loc_prefix: tuple = ()) -> str:
    """One line for a pydantic error: key path (after loc_prefix, e.g. a stage's), YAML line, problem."""
    location = where((*loc_prefix, *err["loc"]), yaml_text)
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(err["loc"][:-1], root))
        return f"{location}: unknown key; allowed here: {allowed}"
    if err["type"] == "missing":
        return f"{location}: required key is missing"
    value = err.get("input")
    # A whole section (for a check across its keys) or a secret is not echoed: it may hold a token.
    if isinstance(value, dict) or tuple(map(str, err["loc"])) in secret_keys:
        return f"{location}: {err['msg']}"
    return f"{location}: {err['msg']} (got {value!r})"


def where(loc: tuple, yaml_text: str | None) -> str:
    """The key path of loc, with its YAML line where the text has it: "train.seed (line 7)"."""
    parts = [str(part) for part in loc]
    key = ".".join(parts) or "(top level)"
    line = _yaml_line(yaml_text, parts)
    return f"{key} (line {line})" if line else key


def _allowed_keys(parent_loc: tuple, root: type[BaseModel]) -> list[str]:
    model = root
    for part in parent_loc:
        annotation = model.model_fields[str(part)].annotation if str(part) in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _yaml_line(yaml_text: str | None, loc: list[str]) -> int | None:
    """1-based line of the deepest key of loc that exists in the YAML text, if any."""
    if not yaml_text:
        return None
    try:
        node = yaml.compose(yaml_text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if k.value == part), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of base with update's keys: mappings merge key by key, any other value replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml_model(path: str | Path, model: type[BaseModel], overrides=()) -> BaseModel:
    """Read a YAML file into a typed config (e.g. data preparation), with the run config's rules:
    --set overrides, ${NAME} references, errors naming the key path and line. Raises DsftError."""
    path = Path(path)
    text = read_text(path)
    raw = parse_yaml(text, path)
    for override in overrides:
        apply_override(raw, override)
    expanded, _, problems = expand_env_references(raw)
    if problems:
        raise invalid(str(path), [f"{where(loc, text)}: {problem}" for loc, problem in problems])
    try:
        return model.model_validate(expanded)
    except ValidationError as exc:
        raise invalid(str(path), [describe(err, text, model) for err in exc.errors()]) from None
