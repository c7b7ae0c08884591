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

import datasets

from posttrain.data.chat import (
    ChatRenderer,
    chat_sequences,
    check_messages,
    encode_chat,
    encode_prompt_chat,
    require_template,
)
from posttrain.data.loading import DataError, Source, load_rows
from posttrain.data.tokenized import MapOptions, as_sources, encode_rows, encoded_chunks, mixed

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


# --------------------------------------------------------------------------------------------
# SFT data sets: the per-row encoder above, run by datasets.map (data/tokenized.py)
# --------------------------------------------------------------------------------------------

SFT_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int64")),
        "loss_mask": datasets.Sequence(datasets.Value("int8")),
        "truncated": datasets.Value("bool"),
        "row": datasets.Value("int64"),
    }
)


@dataclass
class EncodedData:
    examples: list[EncodedExample]
    truncated: int
    skipped: int


def sft_batch(batch, indices, *, tokenizer, fmt, max_length, side, where, offset) -> dict:
    """`encode_sft_examples` over a batch of rows: one output row per example, with its row."""
    out = {"input_ids": [], "loss_mask": [], "truncated": [], "row": []}
    for j, i in enumerate(indices):
        row = {column: values[j] for column, values in batch.items()}
        at = f"{where}: row {offset + i + 1}"
        for ex in encode_sft_examples(tokenizer, row, fmt, max_length, at, side):
            out["input_ids"].append(ex.input_ids)
            out["loss_mask"].append(ex.loss_mask)
            out["truncated"].append(ex.truncated)
            out["row"].append(offset + i)
    return out


def _encode_sft_source(tokenizer, source, fmt, max_length, limit, side, options):
    rows = load_rows(source)
    where = str(source)
    fmt = detect_format(rows.column_names, where, fmt)
    settings = {"kind": "sft", "format": fmt, "max_length": max_length, "side": side}

    def encode(chunk, offset):
        kwargs = dict(tokenizer=tokenizer, fmt=fmt, max_length=max_length, side=side)
        kwargs.update(where=where, offset=offset)
        return encode_rows(
            chunk, sft_batch, kwargs, settings, options, f"tokenising {where}", SFT_FEATURES
        )

    examples, truncated, skipped = [], 0, 0
    for chunk in encoded_chunks(rows, encode, limit):
        last_row = -1
        columns = (chunk["input_ids"], chunk["loss_mask"], chunk["truncated"], chunk["row"])
        for ids, mask, cut, row in zip(*columns):
            if row != last_row:  # as the per-row loop: stop before a row once `limit` is met
                if limit is not None and len(examples) >= limit:
                    break
                last_row = row
            truncated += cut
            if sum(mask[1:]) == 0:  # nothing left to learn (e.g. truncated away)
                skipped += 1
                continue
            examples.append(EncodedExample(ids, mask, cut))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(
            f"{where}: no usable rows ({skipped} had no completion tokens within max_length)"
        )
    return examples, truncated, skipped


def encode_sft_file(
    tokenizer,
    path: str | Source | list[Source],
    fmt: str,
    max_length: int,
    limit: int | None = None,
    side: str = "right",
    options: MapOptions = MapOptions(),
) -> EncodedData:
    """Load and tokenize SFT data (one source, or a mixture of several); rows with no target
    tokens are skipped and counted."""
    sources = as_sources(path)
    parts, truncated, skipped = [], 0, 0
    for source in sources:
        examples, cut, skip = _encode_sft_source(
            tokenizer, source, fmt, max_length, limit, side, options
        )
        parts.append(examples)
        truncated += cut
        skipped += skip
    return EncodedData(mixed(parts, sources, options.seed), truncated, skipped)
