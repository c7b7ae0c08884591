"""Turning rows into token ids with a loss mask (spec section 3).

Three row formats:
- `messages`: a chat; loss on every assistant turn.
- `prompt` + `completion`: strings (plain concatenation, EOS appended) or message lists
  (rendered with the chat template; loss on the completion turns).
- `text`: plain text; loss on every token.

Assistant spans are found as data/chat.py describes: `{% generation %}` markers where the
template has them, else prefix renders checked against the full chat (strings and tokens), with
turns a template rewrites trained in their own context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from posttrain.data.chat import (
    ChatRenderer,
    chat_sequences,
    check_messages,
    encode_chat,
    encode_prompt_chat,
    require_template,
)
from posttrain.data.loading import DataError

FORMATS = ("messages", "prompt_completion", "text")
FORMAT_COLUMNS = {
    "messages": ["messages"],
    "prompt_completion": ["prompt", "completion"],
    "text": ["text"],
}
EXPECTED = "'messages', or 'prompt' and 'completion', or 'text'"


@dataclass
class EncodedExample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target (assistant/completion text)
    truncated: bool = False


def detect_format(columns: list[str], source: str, requested: str = "auto") -> str:
    if requested != "auto":
        missing = [c for c in FORMAT_COLUMNS[requested] if c not in columns]
        if missing:
            raise DataError(
                f"{source}: data.format={requested} needs column(s) {missing}; found: {', '.join(columns)}"
            )
        return requested
    for name in FORMATS:
        if all(c in columns for c in FORMAT_COLUMNS[name]):
            return name
    raise DataError(f"{source}: missing column; expected {EXPECTED} (found: {', '.join(columns)})")


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    require_template(tokenizer, "chat data")
    r = ChatRenderer(tokenizer, "chat data")
    return r.ids(r.text(messages, gen=add_generation_prompt))


def row_tools(row: dict, where: str):
    """The row's `tools` column for the chat template (JSON text is parsed); None if absent."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: 'tools' is not valid JSON ({e.msg})") from None
    return tools or None


def check_prompts(tokenizer, prompts, path: str) -> None:
    """Start-up check of RL prompt rows (grpo, ppo): chat prompts need a chat template and
    known roles; caught here rather than at the first rollout."""
    for i, prompt in enumerate(prompts):
        where = f"{path}: row {i + 1}"
        if isinstance(prompt, list):
            require_template(tokenizer, where)
            check_messages(prompt, where, tokenizer)
        elif not isinstance(prompt, str):
            raise DataError(
                f"{where}: prompt must be a string or a list of messages, "
                f"got {type(prompt).__name__}"
            )


def encode_prompt(tokenizer, prompt, where: str, tools=None) -> list[int]:
    """Token ids of a prompt ready for generation (chat: with the assistant generation prompt)."""
    if isinstance(prompt, list):
        return encode_prompt_chat(tokenizer, prompt, where, tools)
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    raise DataError(
        f"{where}: prompt must be a string or a list of messages, got {type(prompt).__name__}"
    )


def encode_prompt_completion(
    tokenizer, prompt, completion, where: str, tools=None
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) for a prompt and its completion; loss on the completion only."""
    if isinstance(prompt, list) != isinstance(completion, list):
        raise DataError(
            f"{where}: prompt and completion must both be strings or both message lists"
        )
    if isinstance(completion, list):
        return encode_chat(tokenizer, prompt + completion, where, len(prompt), tools)
    if not isinstance(completion, str):
        raise DataError(f"{where}: completion must be a string or a list of messages")
    prompt_ids = encode_prompt(tokenizer, prompt, where)
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def encode_text(tokenizer, text: str, where: str) -> tuple[list[int], list[int]]:
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, [1] * len(ids)


def encode_sft_examples(
    tokenizer, row: dict, fmt: str, max_length: int, where: str, side: str = "right"
) -> list[EncodedExample]:
    """One example per row, plus one per assistant turn the chat template rewrites in the full
    chat (data/chat.py: trained in its own context)."""
    tools = row_tools(row, where)
    if fmt == "messages":
        sequences = chat_sequences(tokenizer, row["messages"], where, tools=tools)
    elif fmt == "prompt_completion":
        p, c = row["prompt"], row["completion"]
        sequences = [encode_prompt_completion(tokenizer, p, c, where, tools)]
    else:
        sequences = [encode_text(tokenizer, row["text"], where)]
    cut = slice(-max_length, None) if side == "left" else slice(0, max_length)
    return [EncodedExample(ids[cut], mask[cut], len(ids) > max_length) for ids, mask in sequences]


def encode_sft_row(tokenizer, row: dict, fmt: str, max_length: int, where: str) -> EncodedExample:
    return encode_sft_examples(tokenizer, row, fmt, max_length, where)[0]
