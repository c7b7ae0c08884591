"""`tools`, the built-in environment: the policy may call tools until it answers.

reset(row): the row's `prompt` (a chat, or a string made the user message). step(message): a
`<tool_call>` in the message (envs/tools.py) runs that tool with a time limit and returns its
result as a `tool` message; a call of an unknown tool or a malformed call returns an error
message instead (the policy may try again, up to `max_turns`). A message without a call is the
final answer: the episode ends with no reward of its own, so the recipe's reward functions
(e.g. `accuracy` against the `answer` column) score it.
"""

from __future__ import annotations

from collections.abc import Callable

from posttrain.envs.tools import call_tool, parse_tool_call

TOOL_TIMEOUT_S = 5.0
"""Wall-clock limit of one tool call (the environment's step has its own, envs/session.py)."""


class ToolEnvironment:
    def __init__(self, tools: dict[str, Callable] | None = None):
        self.tools = dict(tools or {})

    def reset(self, row: dict) -> list[dict]:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        return [dict(m) for m in prompt]

    def step(self, message: dict) -> tuple[list[dict], float | None, bool]:
        call = parse_tool_call(message.get("content") or "")
        if call is None:
            return [], None, True
        if isinstance(call, str):  # malformed: tell the model
            return [{"role": "tool", "content": call}], None, False
        name, arguments = call
        if name not in self.tools:
            known = ", ".join(sorted(self.tools)) or "none"
            text = f"error: unknown tool {name!r} (available: {known})"
            return [{"role": "tool", "content": text}], None, False
        result, _ = call_tool(self.tools[name], arguments, TOOL_TIMEOUT_S)
        return [{"role": "tool", "name": name, "content": result}], None, False
