"""The recipe reference, read from the config dataclasses themselves: every key with its type,
default and docstring (`posttrain config keys ALGO`), and a resolved recipe printed as YAML with
each field's docstring as a comment (`posttrain config show ALGO [RECIPE] [k=v ...]`).

Field docstrings are the string literal right after each field in the class body (the
convention of posttrain/config.py and the algorithm sections, enforced by tests/test_config.py);
Python keeps no record of them, so they are read from the source with `ast`, walking the MRO so
inherited fields (OnlineRLSettings -> GRPOConfig) keep theirs.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml

from posttrain.config import Range, to_dict


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> docstring of dataclass `cls`, base classes first so subclasses override."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # made at run time (a test's subclass): no source
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, [*body[1:], None]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def first_line(doc: str) -> str:
    """The first sentence-ish line of a docstring, for one-line listings."""
    return " ".join(doc.split("\n\n")[0].split())


def type_text(tp: Any) -> str:
    """A reader's spelling of a field annotation: `int >= 1`, `'cosine' | 'linear'`, ..."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        ranges = [e.describe() for e in extras if isinstance(e, Range)]
        text = type_text(base)
        return f"{text} {ranges[0]}" if ranges and ranges[0] != "finite" else text
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        args = typing.get_args(tp)
        return f"{origin.__name__}[{', '.join(type_text(a) for a in args)}]" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


@dataclass
class KeyInfo:
    key: str  # dotted, e.g. "grpo.rewards[].weight" for fields of list items
    type: str
    default: Any
    doc: str


def _list_item_class(tp: Any) -> type | None:
    """The dataclass a `list[SomeConfig]` field holds, or None."""
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (None,)
        if dataclasses.is_dataclass(item):
            return item
    return None


def recipe_keys(recipe_cls: type) -> list[KeyInfo]:
    """Every leaf key of a recipe class in declaration order, with its default (from a default
    instance), type and docstring; the fields of list items (`grpo.rewards[].name`) follow the
    list's own key."""
    out: list[KeyInfo] = []

    def walk(cls: type, instance: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(type(value), value, f"{key}.")
                continue
            plain = to_dict(instance)[f.name]
            out.append(KeyInfo(key, type_text(hints[f.name]), plain, docs.get(f.name, "")))
            item = _list_item_class(hints[f.name])
            if item is not None:
                walk(item, item(), f"{key}[].")

    walk(recipe_cls, recipe_cls(), "")
    return out


def section_docs(recipe_cls: type) -> list[tuple[str, str]]:
    """(section, one-line doc) for each top-level section of a recipe class."""
    docs = field_docs(recipe_cls)
    return [(f.name, first_line(docs.get(f.name, ""))) for f in dataclasses.fields(recipe_cls)]


def _scalar(value: Any) -> str:
    """One value as inline (flow) YAML that safe_load reads back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def _comment(doc: str, indent: str) -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in doc.splitlines()] if doc else []


def commented_yaml(cfg: Any) -> str:
    """`cfg` (a recipe object) as YAML, each field preceded by its docstring as comments.
    yaml.safe_load of the text equals dataclasses.asdict(cfg)."""
    lines: list[str] = []

    def walk(obj: Any, depth: int) -> None:
        indent = "  " * depth
        docs = field_docs(type(obj))
        plain = to_dict(obj)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if depth == 0 and lines:
                lines.append("")
            lines.extend(_comment(docs.get(f.name, ""), indent))
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:")
                walk(value, depth + 1)
            else:
                lines.append(f"{indent}{f.name}: {_scalar(plain[f.name])}")

    walk(cfg, 0)
    return "\n".join(lines) + "\n"


def keys_table(recipe_cls: type) -> str:
    """A plain-text table: key, type, default, first line of the doc."""
    rows = [(k.key, k.type, _scalar(k.default), first_line(k.doc)) for k in recipe_keys(recipe_cls)]
    header = ("key", "type", "default", "doc")
    # Capped: a long Literal or list default overflows its cell rather than widening the column.
    widths = [
        min(max(len(r[i]) for r in [header, *rows]), cap) for i, cap in enumerate((36, 28, 16))
    ]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join(fmt.format(*r).rstrip() for r in [header, *rows]) + "\n"
