"""Typed options: frozen dataclasses whose fields carry a help line, a range or choices.

Method options (``--option key=value``) and the sections of a run configuration are both such
dataclasses, so one checker turns user input into typed values before any model work: an
unknown key, a value of the wrong type or out of range becomes a ``JpruneError`` naming where
it came from, the key and what is accepted. Values arrive as text (the command line) or typed
(YAML / JSON / Python); both go through the same checks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from jprune.errors import JpruneError


class Flag(NamedTuple):
    """How a configuration field is spelled on the command line, where the field's name and
    type do not say it (``jprune prune`` generates one flag per field)."""

    name: str | None = None  # the flag, e.g. "--calib" (None: "--" + the field name, dashed)
    metavar: str | None = None  # the value's placeholder in --help (None: the flag's name)
    inverted: bool = False  # giving the flag sets the field to false (--parallel-blocks)
    repeat: bool = False  # a list given one item per flag (--eval A --eval B), not "A,B"


def option(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[Any, ...] | None = None,
    unset: str | None = None,
    required: bool = False,
    exclusive: str | None = None,
    flag: Flag | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field with its help and the values it accepts.

    ``low`` / ``high`` bound a number (inclusive unless ``*_open``); ``choices`` lists the
    accepted values of a string option (``None`` among them when the option may be unset).
    ``unset`` says what an unset value (none, or an empty list) means, shown as its default;
    ``required``: a run must give a value; fields of one dataclass that share an ``exclusive``
    name are alternatives, at most one given (exactly one when ``required``). ``flag`` spells
    the field on the command line; ``factory`` makes a mutable default (``default`` unused).
    """
    metadata = {"help": help, "low": low, "high": high, "low_open": low_open}
    metadata |= {"high_open": high_open, "choices": choices, "unset": unset}
    metadata |= {"required": required, "exclusive": exclusive, "flag": flag or Flag()}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple, or a factory)")
    return dataclasses.field(default=default, metadata=metadata)


def default_of(field: dataclasses.Field) -> Any:
    """A field's default value (made afresh for a mutable one)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def split_optional(hint) -> tuple[Any, bool]:
    """(the type without ``None``, whether ``None`` is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != len(typing.get_args(hint)):
            return functools.reduce(operator.or_, args), True
    return hint, False


def type_name(hint) -> str:
    base, nullable = split_optional(hint)
    if typing.get_origin(base) is tuple:
        name = f"list of {type_name(typing.get_args(base)[0])}s"
    elif typing.get_origin(base) in (typing.Union, types.UnionType):
        name = " or ".join(type_name(a) for a in typing.get_args(base))
    else:
        name = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(
            base, getattr(base, "__name__", str(base))
        )
    return f"{name} or none" if nullable else name


_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null")


def _from_text(text: str, base) -> Any:
    """Command-line text -> a value of ``base`` (raises ValueError when it is not one)."""
    if base is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError
    if base is int:
        return int(text)
    if base is float:
        return float(text)
    if base is str:
        # Accept JSON quoting too ('"wanda"'), the form earlier releases documented.
        if len(text) >= 2 and text[0] == text[-1] == '"':
            return json.loads(text)
        return text
    if typing.get_origin(base) is tuple:
        items = json.loads(text) if text.startswith("[") else text.split(",")
        return tuple(_convert(i, typing.get_args(base)[0]) for i in items)
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        return _first_that_fits(_from_text, text, typing.get_args(base))
    raise ValueError


def _first_that_fits(convert, value: Any, hints) -> Any:
    """``convert(value, hint)`` for the first of ``hints`` it works for (a union's members)."""
    for hint in hints:
        try:
            return convert(value, hint)
        except ValueError:
            continue
    raise ValueError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Typed values each scalar type accepts as they are (bool is not a number here).
_ACCEPTS = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: _is_number,
    str: lambda v: isinstance(v, str),
}


def _convert(value: Any, hint) -> Any:
    """``value`` (text or typed) as ``hint``; ValueError when it is not one."""
    base, nullable = split_optional(hint)
    if value is None or (isinstance(value, str) and value.lower() in _NONE and base is not str):
        if nullable:
            return None
        raise ValueError
    if isinstance(value, str) and base is not str:
        typed = _from_text(value.strip(), base)
        # Text that stays text is a member of a union that admits strings ("auto").
        return typed if isinstance(typed, str) else _convert(typed, hint)
    if base in _ACCEPTS:
        if _ACCEPTS[base](value):
            return float(value) if base is float else value
        raise ValueError
    if typing.get_origin(base) in (Mapping, dict):
        if isinstance(value, Mapping):
            return dict(value)
        raise ValueError
    if typing.get_origin(base) is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_convert(v, typing.get_args(base)[0]) for v in value)
        raise ValueError
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        return _first_that_fits(_convert, value, typing.get_args(base))
    raise ValueError


def _range_text(meta: Mapping[str, Any]) -> str | None:
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return None
    left = "(" if meta.get("low_open") else "["
    right = ")" if meta.get("high_open") else "]"
    return f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"


def _check_value(value: Any, meta: Mapping[str, Any]) -> bool:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        return False
    numbers = value if isinstance(value, tuple) else (value,)
    for number in numbers:
        if not _is_number(number):
            continue
        if isinstance(number, float) and math.isnan(number):
            return False
        low, high = meta.get("low"), meta.get("high")
        if low is not None and (number < low or (meta.get("low_open") and number == low)):
            return False
        if high is not None and (number > high or (meta.get("high_open") and number == high)):
            return False
    return True


def accepted(field: dataclasses.Field, hint) -> str:
    """What a field accepts, in words: its type and its range or choices."""
    choices = field.metadata.get("choices")
    if choices is not None:
        return "one of " + ", ".join("none" if c is None else str(c) for c in choices)
    span = _range_text(field.metadata)
    name = type_name(hint)
    article = "an" if name[0] in "aeiou" else "a"
    return f"{article} {name}" + (f" in {span}" if span else "")


def parse_fields(cls, raw: Mapping[str, Any], where: str, others: Mapping[str, str] = {}):
    """``cls(**raw)`` with every value converted and checked; ``where`` names the owner in
    errors (``"method 'fista'"``); ``others`` maps keys of other owners to their names, so
    a key given to the wrong owner is named as such."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            known = ", ".join(sorted(fields)) if fields else "none"
            hint = f"; {key!r} is an option of {others[key]}" if key in others else ""
            raise JpruneError(f"{where} has no option {key!r} (its options: {known}){hint}")
        field = fields[key]
        try:
            converted = _convert(value, hints[key])
        except (ValueError, TypeError, json.JSONDecodeError):
            converted, ok = None, False
        else:
            ok = _check_value(converted, field.metadata)
        if not ok:
            raise JpruneError(
                f"{where} option {key!r} must be {accepted(field, hints[key])}, got {value!r}"
            )
        values[key] = converted
    return cls(**values)


def as_dict(instance) -> dict[str, Any]:
    """A dataclass instance as JSON-ready values (tuples as lists, nested sections as dicts)."""
    out = {}
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            value = as_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
        out[f.name] = value
    return out


def describe(cls) -> list[str]:
    """One line per field: name, accepted values, default, help."""
    hints = _hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = "none" if f.default is None else f.default
        if isinstance(default, tuple):
            default = ",".join(str(v) for v in default) or "()"
        lines.append(
            f"  {f.name} ({accepted(f, hints[f.name])}; default {default}): {f.metadata.get('help', '')}"
        )
    return lines
