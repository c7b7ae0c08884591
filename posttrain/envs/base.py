"""The `Environment` protocol and how a recipe names one.

An environment is a class; one instance is made per sampled conversation (so it may keep
state) and driven as

    messages = env.reset(row)                      # the opening chat, from a data row
    new_messages, reward, done = env.step(message) # after each assistant turn

`row` is the data row (a dict of its columns: `prompt`, `answer`, `tools`, ...); `message` is
`{"role": "assistant", "content": text}`; `new_messages` (e.g. `[{"role": "tool", "content":
...}]`) are appended to the conversation and the policy answers them, unless `done`. `reward`
(a float or None) is added to the sample's reward; the recipe's reward functions score the last
assistant message on top (`grpo.rewards`; `[]` for none).

A recipe names an environment as a built-in (`BUILTIN_ENVIRONMENTS`) or `module:Class` (found
on sys.path like reward functions; the CLI adds the working directory). The class is called with
`tools=` (name -> callable, the recipe's `grpo.tools` plus a row's `tools` column) when its
`__init__` takes a `tools` argument, else with no arguments.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

from posttrain.errors import UserError
from posttrain.utils import resolve_named


class EnvironmentSpecError(UserError, ValueError):
    """An environment named in a recipe that cannot be built."""


@runtime_checkable
class Environment(Protocol):
    """What the multi-turn rollout drives (see the module docstring)."""

    def reset(self, row: dict[str, Any]) -> list[dict]: ...

    def step(self, message: dict) -> tuple[list[dict], float | None, bool]: ...


def builtin_environments() -> dict[str, type]:
    from posttrain.envs.tool_env import ToolEnvironment

    return {"tools": ToolEnvironment}


def resolve_environment(name: str) -> type:
    """The environment class a recipe names: a built-in or `module:Class`."""
    cls = resolve_named(
        name, builtin_environments(), "environment", "module:Class", EnvironmentSpecError
    )
    if not (callable(getattr(cls, "reset", None)) and callable(getattr(cls, "step", None))):
        raise EnvironmentSpecError(
            f"environment {name!r} is not an environment class: it needs reset(row) and "
            "step(message) methods"
        )
    return cls


def make_environment(cls: type, tools: dict) -> Any:
    """One instance of `cls`, given the tools when its __init__ takes them."""
    try:
        takes_tools = "tools" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        takes_tools = False
    return cls(tools=tools) if takes_tools else cls()
