"""Load a user's Python function named in the config as "module:function" or "path/to/file.py:function".

Shared by every config key that takes user code (eval checks, classifier filters, back translation),
so they all accept the same forms and report failures the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

from dsft.errors import DsftError


def load_function(spec: str, key: str) -> Callable:
    """The callable named by spec ("module:function" or "path/to/file.py:function").

    key is the config key path holding spec (e.g. "eval.checks[0].python"); every error names it.
    Raises DsftError when spec has no ":", the module cannot be imported, the file is missing or
    fails while running, or the name is not a callable of the module.
    """
    location, sep, function_name = spec.rpartition(":")
    if not sep or not location or not function_name:
        raise DsftError(f"{key}: {spec!r} is not \"module:function\" or \"path/to/file.py:function\"")
    module = _load_module_file(location, key) if location.endswith(".py") else _import_module(location, key)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DsftError(f"{key}: {location} has no function {function_name!r}")
    return function


def _import_module(name: str, key: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:  # the user's module may fail any way while importing; report it as theirs
        raise DsftError(f"{key}: cannot import {name}: {type(exc).__name__}: {exc}") from None


def _load_module_file(path: str, key: str):
    if not Path(path).is_file():
        raise DsftError(f"{key}: file not found: {path}")
    # One module name per config key, so two keys loading files never replace each other's module.
    module_name = "dsft_user_" + re.sub(r"\W", "_", key)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as importlib's recipe does: dataclasses and pickle look modules up there.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file may fail any way while running; report it as theirs
        del sys.modules[module_name]
        raise DsftError(f"{key}: loading {path} failed: {type(exc).__name__}: {exc}") from None
    return module
