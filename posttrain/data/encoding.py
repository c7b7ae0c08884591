"""Turning rows into token ids with a loss mask (spec section 3).

Three row formats:
- `messages`: a chat; loss on every assistant turn.
- `prompt` + `completion`: strings (plain concatenation, EOS appended) or message lists
  (rendered with the chat template; loss on the completion turns).
- `text`: plain text; loss on every token.

Assistant spans are found by rendering the chat twice, up to a turn with the generation prompt
and up to the end of that turn, and taking the difference. This works with any chat template
that is prefix-stable (checked, with a clear error when it is not) and needs no `{% generation %}`
markers in the template.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    if tokenizer.chat_template is None:
        raise DataError(
            "the tokenizer has no chat template, but the data is conversational; "
            "use a chat model or plain-text prompt/completion strings"
        )
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return list(ids)


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: every message needs 'role' and 'content', got {m!r}")


def encode_chat(
    tokenizer, messages: list[dict], where: str, train_from: int = 0
) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat and a mask over assistant turns at index >= train_from."""
    _check_messages(messages, where)
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1])
        if upto[: len(before)] != before or len(before) < len(ids):
            raise DataError(
                f"{where}: the chat template is not prefix-stable (rendering the chat up to turn {i} "
                "is not a prefix of the longer chat), so assistant tokens cannot be located"
            )
        mask.extend([0] * (len(before) - len(ids)))
        mask.extend([1] * (len(upto) - len(before)))
        ids = upto
    full = render_chat(tokenizer, messages)
    if full[: len(ids)] != ids:
        raise DataError(f"{where}: the chat template is not prefix-stable")
    mask.extend([0] * (len(full) - len(ids)))
    return full, mask


def encode_prompt(tokenizer, prompt, where: str) -> list[int]:
    """Token ids of a prompt ready for generation (chat: with the assistant generation prompt)."""
    if isinstance(prompt, list):
        _check_messages(prompt, where)
        return render_chat(tokenizer, prompt, add_generation_prompt=True)
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    raise DataError(
        f"{where}: prompt must be a string or a list of messages, got {type(prompt).__name__}"
    )


def encode_prompt_completion(
    tokenizer, prompt, completion, where: str
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) for a prompt and its completion; loss on the completion only."""
    if isinstance(prompt, list) != isinstance(completion, list):
        raise DataError(
            f"{where}: prompt and completion must both be strings or both message lists"
        )
    if isinstance(completion, list):
        _check_messages(completion, where)
        return encode_chat(tokenizer, prompt + completion, where, train_from=len(prompt))
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


def encode_sft_row(tokenizer, row: dict, fmt: str, max_length: int, where: str) -> EncodedExample:
    if fmt == "messages":
        ids, mask = encode_chat(tokenizer, row["messages"], where)
    elif fmt == "prompt_completion":
        ids, mask = encode_prompt_completion(tokenizer, row["prompt"], row["completion"], where)
    else:
        ids, mask = encode_text(tokenizer, row["text"], where)
    truncated = len(ids) > max_length
    return EncodedExample(ids[:max_length], mask[:max_length], truncated)
