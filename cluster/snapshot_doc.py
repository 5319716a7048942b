"""Strict reading of a JSON document into typed fields, for `cluster.snapshot`'s decoders.

Why not `.get(key, 0)`: a field the server renamed would then show as zeros on the dashboard. Here a
missing field or a wrong type raises one exception that names the field's path. Stdlib only.
"""

from __future__ import annotations

from typing import Any

from cluster.errors import OrchardError


class SnapshotDecodeError(OrchardError, ValueError):
    """A document is not a snapshot this code reads: a field is missing or has the wrong type. The
    message names the field's path. Server and reader disagree about the schema: say so, never guess."""


class Doc:
    """A JSON object being decoded, with its path for error messages."""

    __slots__ = ("d", "path")

    def __init__(self, obj: object, path: str) -> None:
        if not isinstance(obj, dict):
            raise SnapshotDecodeError(f"{path or 'document'}: expected an object, got {_kind(obj)}")
        self.d: dict[str, Any] = obj
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str) -> Any:
        try:
            return self.d[key]
        except KeyError:
            raise SnapshotDecodeError(f"{self.at(key)}: missing") from None

    def _bad(self, key: str, want: str, value: object) -> SnapshotDecodeError:
        return SnapshotDecodeError(f"{self.at(key)}: expected {want}, got {_kind(value)}")

    def integer(self, key: str) -> int:
        v = self.get(key)
        if type(v) is not int:
            raise self._bad(key, "an integer", v)
        return v

    def number(self, key: str) -> float:
        v = self.get(key)
        if type(v) not in (int, float):
            raise self._bad(key, "a number", v)
        return float(v)

    def text(self, key: str) -> str:
        v = self.get(key)
        if not isinstance(v, str):
            raise self._bad(key, "a string", v)
        return v

    def flag(self, key: str) -> bool:
        v = self.get(key)
        if not isinstance(v, bool):
            raise self._bad(key, "true or false", v)
        return v

    def optional_text(self, key: str) -> str | None:
        return None if self.get(key) is None else self.text(key)

    def optional_number(self, key: str) -> float | None:
        return None if self.get(key) is None else self.number(key)

    def child(self, key: str) -> Doc:
        return Doc(self.get(key), self.at(key))

    def _list(self, key: str) -> list[Any]:
        v = self.get(key)
        if not isinstance(v, list):
            raise self._bad(key, "a list", v)
        return v

    def children(self, key: str) -> list[Doc]:
        return [Doc(item, f"{self.at(key)}[{i}]") for i, item in enumerate(self._list(key))]

    def numbers(self, key: str) -> tuple[float, ...]:
        items = self._list(key)
        if not all(type(x) in (int, float) for x in items):
            raise self._bad(key, "a list of numbers", items)
        return tuple(float(x) for x in items)

    def integers(self, key: str) -> tuple[int, ...]:
        items = self._list(key)
        if not all(type(x) is int for x in items):
            raise self._bad(key, "a list of integers", items)
        return tuple(items)

    def counts(self, key: str) -> dict[str, int]:
        obj = self.child(key)
        return {k: obj.integer(k) for k in obj.d}


def _kind(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
