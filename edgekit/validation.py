"""Reading typed fields out of YAML mappings, with errors that name the file, the field and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError


def read_json(path: Path, missing: str) -> Any:
    """The JSON document in ``path``; ``missing`` is the error when there is no such file."""
    if not path.is_file():
        raise EdgekitError(missing)
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgekitError(f"{path}: not valid JSON ({exc})") from exc


class Fields:
    """Reads typed fields out of a mapping, raising errors that name the file and the field path."""

    def __init__(self, data: Any, where: str, prefix: str = "") -> None:
        if not isinstance(data, dict):
            raise EdgekitError(f"{where}: {prefix.rstrip('.') or 'the file'} must be a mapping, got {type(data).__name__}")
        self.data, self.where, self.prefix = data, where, prefix
        self.used: set[str] = set()

    def _fail(self, key: str, expected: str, value: Any = ...) -> EdgekitError:
        got = "missing" if value is ... else f"got {value!r}"
        return EdgekitError(f"{self.where}: field '{self.prefix}{key}' must be {expected} ({got})")

    def get(self, key: str, kind: type | tuple[type, ...], expected: str, default: Any = ...) -> Any:
        self.used.add(key)
        # An explicit null (YAML ``~``, JSON ``null``) of an optional field means its default.
        if key not in self.data or (self.data[key] is None and default is not ...):
            if default is ...:
                raise self._fail(key, expected)
            return default
        value = self.data[key]
        # bool is an int subclass; a YAML `yes` must not pass for a count.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise self._fail(key, expected, value)
        return value

    def choice(self, key: str, allowed: tuple[Any, ...], default: Any = ...) -> Any:
        value = self.get(key, object, f"one of {', '.join(map(str, allowed))}", default)
        if value is default and default is not ...:  # absent and optional: the default stands
            return value
        if value not in allowed:
            raise self._fail(key, f"one of {', '.join(map(str, allowed))}", value)
        return value

    def number(self, key: str, low: float, high: float, integer: bool = False, default: Any = ...) -> Any:
        kind = int if integer else (int, float)
        expected = f"{'an integer' if integer else 'a number'} from {low} to {high}"
        value = self.get(key, kind, expected, default)
        if not low <= value <= high:
            raise self._fail(key, expected, value)
        return value

    def nested(self, key: str, optional: bool = False) -> Fields:
        self.used.add(key)
        if key not in self.data:
            if not optional:
                raise self._fail(key, "a mapping")
            return Fields({}, self.where, f"{self.prefix}{key}.")
        return Fields(self.data[key], self.where, f"{self.prefix}{key}.")

    def check_unknown(self) -> None:
        """Refuse fields nobody read: a typo must not silently fall back to a default."""
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise EdgekitError(
                f"{self.where}: unknown field '{self.prefix}{unknown[0]}'; allowed: {', '.join(sorted(self.used))}"
            )


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
