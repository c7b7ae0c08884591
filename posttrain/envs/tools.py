"""Tools: plain Python callables a policy calls from its completion, and the call format.

A tool is any function with type hints and a Google-style docstring (`def calculator(expression:
str) -> str`); its JSON schema comes from transformers' `get_json_schema`, the same one
`apply_chat_template(tools=[fn])` renders, so the model's own chat template shows the tools.

The call format is Hermes / Qwen's, the most common among open chat models:

    <tool_call>{"name": "calculator", "arguments": {"expression": "123 * 4567"}}</tool_call>

`parse_tool_call` reads the FIRST such block of a completion (JSON inside, whitespace allowed);
a malformed block is reported as an error message for the model, not raised.

Tools run with a wall-clock limit (`call_tool`): a tool that raises or outlives the limit gives
the model an `error: ...` result and the conversation goes on. A timed-out call runs on in an
abandoned daemon thread (Python cannot kill a thread), so tools that run untrusted code use the
sandboxed subprocess instead (`python` below, scoring/sandbox.py), which is killed.

Built-ins (`BUILTIN_TOOLS`): `calculator` (arithmetic on numbers, parsed with `ast`, never
`eval`; defined with the bundled task in data/tools.py, as is the call format) and `python` (runs code in the sandbox, returns its stdout).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from posttrain.data.tools import calculator, format_tool_call, parse_tool_call
from posttrain.errors import UserError
from posttrain.scoring.sandbox import run_in_subprocess
from posttrain.utils import resolve_named


class ToolError(UserError, ValueError):
    """A tool named in a recipe or a row that cannot be resolved."""


def python(code: str) -> str:
    """Run a Python program and return what it prints.

    Args:
        code: The program; print the result.
    """
    ok, stdout = run_in_subprocess(code, timeout_s=5.0, memory_mb=512, max_output_bytes=4096)
    return stdout.strip() if ok else f"error: the program failed\n{stdout.strip()}"


BUILTIN_TOOLS: dict[str, Callable[..., str]] = {"calculator": calculator, "python": python}


def resolve_tool(name: str) -> Callable:
    """A built-in tool by name, or `module:function` (found on sys.path, as reward functions)."""
    fn = resolve_named(name, BUILTIN_TOOLS, "tool", "module:function", ToolError)
    if not callable(fn):
        raise ToolError(f"tool {name!r} is a {type(fn).__name__}, not a callable")
    return fn


def tool_schema(fn: Callable) -> dict:
    """The JSON schema `apply_chat_template(tools=...)` renders for `fn`; a one-line ToolError
    when its docstring or type hints do not describe every argument."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as error:  # transformers' DocstringParsingException / TypeHintParsingException
        raise ToolError(
            f"tool {getattr(fn, '__name__', fn)!r}: needs type hints and a Google-style docstring "
            f"with an Args: line per argument ({error})"
        ) from error


def call_tool(fn: Callable, arguments: dict, timeout_s: float) -> tuple[str, str]:
    """(result text, outcome) of fn(**arguments) with a wall-clock limit; outcome is "ok",
    "error" (raised: the text says why) or "timeout" (abandoned, see the module docstring)."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn(**arguments)
        except BaseException as error:
            box["error"] = error

    worker = threading.Thread(target=target, name="posttrain-tool", daemon=True)
    worker.start()
    worker.join(timeout_s if timeout_s > 0 else None)
    if worker.is_alive():
        return f"error: the tool did not answer within {timeout_s:g} s", "timeout"
    if "error" in box:
        error = box["error"]
        return f"error: {type(error).__name__}: {error}", "error"
    return str(box["value"]), "ok"


__all__ = [
    "BUILTIN_TOOLS",
    "call_tool",
    "format_tool_call",
    "parse_tool_call",
    "resolve_tool",
    "tool_schema",
]
