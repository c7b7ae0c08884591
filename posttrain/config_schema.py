"""The schema machinery of posttrain's typed config: `Range` annotations and their aliases, and
building dataclasses from plain dicts with errors that name the dotted key (`from_dict`).
`posttrain/config.py` declares the sections with it and re-exports every name here."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from posttrain.errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the config schema; the message says where."""


@dataclass(frozen=True)
class Range:
    """The valid interval of a numeric field, declared in its annotation:

        batch_size: Annotated[int, Range(ge=1)] = 8      (or the alias PositiveInt)

    `from_dict` checks every value against it, so a bad number is a load-time error that names
    the key, the value and the range instead of a ZeroDivisionError deep in training. Floats are
    also required to be finite. `Range()` declares "any finite number" explicitly."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        parts = [
            f"{op} {bound:g}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        ]
        return " and ".join(parts) if parts else "finite"

    def check(self, value: Any, where: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}={value!r} is out of range: it must be a finite number")
        ok = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        if not ok:
            raise ConfigError(f"{where}={value!r} is out of range: it must be {self.describe()}")


# The common ranges by name (use Annotated[float, Range(...)] for any other).
PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
"""A probability-like number in [0, 1]."""
AnyFloat = Annotated[float, Range()]
"""Any finite number (declared, so that every numeric field states its range)."""


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with errors that say where
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Annotated:  # a declared range: coerce to the base type, then check it
        base, *extras = typing.get_args(tp)
        value = _coerce(value, base, where)
        for extra in extras:
            if isinstance(extra, Range):
                extra.check(value, where)
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):
            # YAML 1.1 reads an unquoted no/off/yes/on as a boolean: `mixed_precision=no`.
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((w for w in words if w in choices), value)
        if value in choices:
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], 1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}{hint}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:  # `dict[str, Any]` or a bare `dict`
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a dict, checking every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping of keys, got {data!r}")
    if not where:
        check_moved_keys(cls, data)
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{where + '.' if where else ''}{near[0]}'?" if near else ""
            raise ConfigError(f"unknown key '{path}'{hint} (valid keys here: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def check_moved_keys(cls: type, data: dict) -> None:
    """A recipe class may list keys that moved (`moved_keys`: old dotted key -> new place) and
    check other retired spellings (`check_moved(data)`): an old recipe then fails with a
    ConfigError naming the new place instead of 'unknown key'."""
    for old, new in getattr(cls, "moved_keys", {}).items():
        node: Any = data
        for part in old.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(f"'{old}' moved to '{new}'")
    check = getattr(cls, "check_moved", None)
    if check is not None:
        check(data)


def reject_unused(cfg: Any, algorithm: str, reasons: dict[str, str]) -> None:
    """ConfigError naming `algorithm` when a key it does not use (dotted path -> why not) is set
    to anything but its default, so no recipe key is silently ignored."""
    for key, reason in reasons.items():
        *sections, name = key.split(".")
        node = cfg
        for part in sections:
            node = getattr(node, part)
        default = type(node)().__getattribute__(name)
        if getattr(node, name) != default:
            raise ConfigError(f"{algorithm}: {key} is not used ({reason}); remove it")


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


# --------------------------------------------------------------------------------------------
# Recipes and overrides
# --------------------------------------------------------------------------------------------
