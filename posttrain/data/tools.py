"""The bundled tool-use task: 3-4 digit multiplication with a `calculator` tool.

The tiny model cannot multiply 1234 * 567 in its head; it can learn to write the call and copy
the tool's result. `posttrain data tools OUT_DIR` writes, for a train and a held-out split:

| file                      | columns                   | used by                       |
|---------------------------|---------------------------|-------------------------------|
| tools_sft_{split}.jsonl   | messages, tools (schemas) | sft (tool-use transcripts)    |
| tools_rl_{split}.jsonl    | prompt, answer            | grpo/kimi/ppo with an env     |

A transcript is user question -> assistant `<tool_call>{...}</tool_call>` -> tool result ->
assistant answer (the bare number). Held-out operand pairs are drawn first and never appear in
train. The call format (Hermes / Qwen style, `format_tool_call` / `parse_tool_call`) and the
calculator live here, with the task; envs/tools.py runs them.
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re
import warnings
from pathlib import Path

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
PROMPT_TEMPLATES = ("What is {a} * {b}?", "Compute {a} * {b}.", "{a} * {b} = ?")
LOW, HIGH = 100, 9999  # 3-4 digit operands


def format_tool_call(name: str, arguments: dict) -> str:
    """The text of one call, as the policy should write it (compact JSON)."""
    payload = json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"))
    return f"<tool_call>{payload}</tool_call>"


def parse_tool_call(text: str) -> tuple[str, dict] | str | None:
    """(name, arguments) of the first `<tool_call>` block in `text`; None when there is none; a
    string (the error to show the model) when the block is not {"name": str, "arguments": {}}."""
    match = TOOL_CALL.search(text)
    if match is None:
        return None
    try:
        call = json.loads(match.group(1))
    except json.JSONDecodeError as error:
        return f"error: the tool call is not valid JSON ({error.msg})"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return 'error: a tool call is {"name": ..., "arguments": {...}}'
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        return "error: the tool call's arguments must be a JSON object"
    return call["name"], arguments


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arithmetic(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _arithmetic(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _arithmetic(node.left), _arithmetic(node.right)
        if isinstance(node.op, ast.Mult) and abs(left) * abs(right) > 1e30:
            raise ValueError("the result is too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_arithmetic(node.operand))
    raise ValueError("only numbers and + - * / // % ( ) are allowed")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: Numbers with + - * / // % and parentheses, e.g. "123*4567".
    """
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    with warnings.catch_warnings():  # "2or 3" is the model's mistake: a tool error, not a warning
        warnings.simplefilter("ignore", SyntaxWarning)
        tree = ast.parse(expression, mode="eval")
    value = _arithmetic(tree)  # ast, never eval()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def tool_transcript(a: int, b: int, question: str) -> list[dict]:
    """The ideal conversation for one problem (the SFT target)."""
    expression = f"{a}*{b}"
    return [
        {"role": "user", "content": question},
        {
            "role": "assistant",
            "content": format_tool_call("calculator", {"expression": expression}),
        },
        {"role": "tool", "name": "calculator", "content": calculator(expression)},
        {"role": "assistant", "content": str(a * b)},
    ]


def _pairs(rng: random.Random, count: int, exclude: set) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    while len(out) < count:
        pair = (rng.randint(LOW, HIGH), rng.randint(LOW, HIGH))
        if pair not in exclude:
            out.append(pair)
    return out


def make_tools(out_dir: str | Path, n: int = 4000, n_test: int = 200, seed: int = 0) -> dict:
    """Write the task to `out_dir`; returns {file name: row count}."""
    from transformers.utils import get_json_schema

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    test = _pairs(rng, n_test, set())
    train = _pairs(rng, n, set(test))
    schema = [get_json_schema(calculator)]
    counts = {}
    for split, pairs in (("train", train), ("test", test)):
        sft, rl = [], []
        for a, b in pairs:
            question = rng.choice(PROMPT_TEMPLATES).format(a=a, b=b)
            sft.append({"messages": tool_transcript(a, b, question), "tools": schema})
            rl.append({"prompt": [{"role": "user", "content": question}], "answer": str(a * b)})
        for kind, rows in (("tools_sft", sft), ("tools_rl", rl)):
            path = out_dir / f"{kind}_{split}.jsonl"
            with path.open("w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            counts[path.name] = len(rows)
    return counts
