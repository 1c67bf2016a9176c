"""Checked reading of JSON objects a console receives from devices (state, job replies).

Lenient where mixed agent versions need it: a missing optional field has its default,
an unknown extra field is ignored. Strict on types: a field of the wrong type raises
ProtocolError with the subject's stable code, naming the field and the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.protocol.messages import ProtocolError, shown


@dataclass(frozen=True)
class Subject:
    """What is read ("state", "deploy reply") and the code its errors carry."""

    name: str
    code: str


@dataclass(frozen=True)
class Reader:
    """Typed access to one object; `where` (e.g. "update.") prefixes field names."""

    obj: Mapping[str, Any]
    where: str
    subject: Subject

    @classmethod
    def of(cls, value: object, where: str, subject: Subject) -> Reader:
        if not isinstance(value, dict):
            raise ProtocolError(
                subject.code,
                f"{subject.name}: {where or 'the body '}must be a JSON object, not {shown(value)}",
            )
        return cls(value, where, subject)

    def bad(self, key: str, want: str, value: object) -> ProtocolError:
        return ProtocolError(
            self.subject.code,
            f"{self.subject.name}: {self.where}{key} must be {want}, not {shown(value)}",
        )

    def text(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        value = self.obj.get(key)
        if value is None:
            if required:
                raise self.bad(key, "a string", value)
            return default
        if not isinstance(value, str):
            raise self.bad(key, "a string", value)
        return value

    def need_text(self, key: str) -> str:
        value = self.text(key, required=True)
        assert value is not None
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.bad(key, "true or false", value)
        return value

    def number(self, key: str) -> float | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.bad(key, "a number", value)
        try:
            return float(value)
        except OverflowError:
            raise self.bad(key, "a number in range", value) from None

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.obj.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.bad(key, "an object", value)
        return dict(value)

    def child(self, key: str) -> Reader | None:
        value = self.obj.get(key)
        if value is None:
            return None
        return Reader.of(value, f"{self.where}{key}.", self.subject)

    def children(self, key: str) -> list[Reader]:
        value = self.obj.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.bad(key, "a list of objects", value)
        return [Reader.of(v, f"{self.where}{key}[{i}].", self.subject) for i, v in enumerate(value)]

    def names(self, key: str) -> tuple[str, ...]:
        value = self.obj.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.bad(key, "a list of strings", value)
        return tuple(value)
