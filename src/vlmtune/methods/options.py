"""Method options: typed, range-checked config dataclasses (pydantic), CLI strings, presets and their docs.

Every method's config is a frozen dataclass declared with ``@method_config``: pydantic validates it in strict
mode whenever it is built (from Python, the CLI or a saved ``config.json``), so ``n_ctx=4.5``, ``lr=[1, 2]``,
``batch_size=0`` or a bool where a number belongs fail at once with a one-line message. ``option(default, doc,
**constraints)`` declares one field with its range (``ge``, ``gt``, ``le``) and a one-line doc that
``vlmtune list methods --options`` prints.

Why pydantic: it is the well-kept validation library the HTTP service already uses; it reads constraints from the
field declarations (no parser or range table of our own) and keeps configs plain dataclasses (``asdict``,
``replace``, pickling for worker processes all work).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import pydantic
from pydantic import ConfigDict, Field, ValidationError
from typing_extensions import dataclass_transform

from vlmtune.errors import UnknownName, VlmtuneError

T = TypeVar("T")
_STRICT = ConfigDict(extra="forbid", strict=True)


EXECUTION_OPTIONS = frozenset({"workers"})  # options that change how a method runs (speed), never its result


@dataclass_transform(frozen_default=True, field_specifiers=(Field,))
def method_config(cls: type[T]) -> type[T]:
    """Class decorator: a frozen, strictly validated config dataclass."""
    return pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)(cls)  # type: ignore[return-value]


def option(default: Any, doc: str, **constraints: Any) -> Any:
    """One config field: its default, a one-line doc, and pydantic constraints (``ge=1``, ``gt=0``, ...)."""
    return Field(default, description=doc, **constraints)


class OptionError(VlmtuneError, ValueError):
    """A method option with the wrong type or out of range."""


def _parse_text(key: str, text: str, hint: Any, method: str) -> Any:
    """A CLI string as the option's type: kept as text for ``str`` options ("none" -> None where allowed),
    JSON otherwise (numbers, true/false, lists, null)."""
    allowed = _allowed_types(hint)
    if str in allowed:
        return None if type(None) in allowed and text.lower() in ("none", "null") else text
    word = text.strip().lower()
    word = {"none": "null", "auto": "null"}.get(word, word) if type(None) in allowed else word
    try:
        return json.loads(word if word in ("true", "false", "null") else text)
    except json.JSONDecodeError:
        raise OptionError(f"option {key} of {method}: cannot read {text!r} as {_type_name(hint)}") from None


def _allowed_types(hint: Any) -> tuple[Any, ...]:
    """The runtime types an annotation admits: ``int | None`` -> (int, NoneType), ``Literal["a"]`` -> (str,)."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return tuple({type(a) for a in typing.get_args(hint)})
    if origin in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(hint) for t in _allowed_types(a))
    return (origin or hint,)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    text = str(hint).replace("typing.", "")
    return text.removeprefix("<class '").removesuffix("'>")


def _tuples(value: Any, hint: Any) -> Any:
    """JSON lists for tuple-typed options (strict mode wants tuples)."""
    tuple_typed = tuple in _allowed_types(hint)
    return tuple(value) if tuple_typed and isinstance(value, list) else value


def build_config(
    cls: type[T], method: str, overrides: Mapping[str, Any] | None = None, presets: Mapping[str, Mapping] | None = None
) -> T:
    """``cls`` with ``overrides`` (CLI strings converted by the field's type); ``preset=NAME`` applies a named
    preset first, then the other overrides. Any problem raises ``OptionError`` / ``UnknownName``, one line."""
    overrides = dict(overrides or {})
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    preset = overrides.pop("preset", None)
    if preset not in (None, "", "none"):
        presets = presets or {}
        if not presets:
            raise OptionError(f"{method} has no presets")
        if preset not in presets:
            raise UnknownName(f"preset of {method}", str(preset), list(presets))
        values.update(presets[preset])
    for key, value in overrides.items():
        if key not in hints:
            raise UnknownName(f"option of {method}", key, [*hints, "preset"])
        if isinstance(value, str):
            value = _parse_text(key, value, hints[key], method)
        values[key] = _tuples(value, hints[key])
    try:
        return cls(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise OptionError(
            f"option {key} of {method}: {first['msg'].lower()} (got {first.get('input')!r}; "
            f"expected {_type_name(hints.get(key, Any))})"
        ) from None


@dataclasses.dataclass(frozen=True)
class OptionDoc:
    name: str
    type: str
    default: Any
    doc: str
    constraints: str


def describe(cls: type) -> list[OptionDoc]:
    """Each option of a config class: name, type, default, one-line doc and its range."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = getattr(cls, "__pydantic_fields__", {})
    defaults = cls()
    out = []
    for f in dataclasses.fields(cls):
        info = fields.get(f.name)
        limits = ", ".join(_constraint(m) for m in (info.metadata if info else []))
        doc = (info.description if info else None) or ""
        out.append(OptionDoc(f.name, _type_name(hints[f.name]), getattr(defaults, f.name), doc, limits))
    return out


def _constraint(meta: Any) -> str:
    for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if getattr(meta, attr, None) is not None:
            return f"{sign} {getattr(meta, attr)}"
    return str(meta)


def filter_preset(preset: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """The part of a preset that ``cls`` has fields for (BBT shares CraFT's presets minus the head)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in preset.items() if k in names}


def options_schema(methods: list[Any]) -> dict[str, Any]:
    """A JSON schema of a config file's ``options`` table: per method (a registry entry with ``name``,
    ``config_cls`` and ``presets``) its options with types, defaults, ranges and docs, plus ``preset``."""
    schemas: dict[str, Any] = {}
    for m in methods:
        schema = pydantic.TypeAdapter(m.config_cls).json_schema(mode="serialization")
        props = schema.setdefault("properties", {})
        props["preset"] = {"type": "string", "description": "a named option set", "enum": list(m.presets)}
        schema["required"] = []
        schema["additionalProperties"] = False
        schemas[m.name] = schema
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "vlmtune method options",
        "type": "object",
        "properties": schemas,
        "additionalProperties": False,
    }
