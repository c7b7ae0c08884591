"""Chat rows to token ids with an assistant-token mask, for any family's chat template.

Three ways to find the assistant tokens, in order:
1. The template has `{% generation %}` markers: transformers' `return_assistant_tokens_mask`
   marks exactly the tokens the template wraps.
2. Otherwise each assistant turn i is located by rendering the chat up to it (with the
   generation prompt) and up to its end, and both renders are checked to be prefixes of the
   FULL chat's render, as strings and as tokens. Comparing lengths is not enough: templates that
   rewrite history (Qwen3 drops earlier `<think>` blocks, and adds an empty one only to the
   latest turn) give renders of the right length and the wrong content. Where the prefixes
   differ only elsewhere (Mistral moves the system prompt into the last user turn), the turn is
   found by rendering the full chat with its content replaced by a sentinel, and used if the
   full render holds the content verbatim there.
3. A turn that the full render rewrote cannot be located in it, so it is trained in its own
   context instead ("per-turn rendering"): one extra sequence, the chat rendered up to and
   including that turn, with the loss on that turn only. Callers that need exactly one sequence
   (preference pairs) get a DataError naming the row and the turn.

Rows are checked first: roles must be system/user/assistant/tool or a role the template names;
an assistant message may carry `tool_calls` and no `content`; the row's `tools` go to the
template.
"""

from __future__ import annotations

import re

from posttrain.data.loading import DataError

BASE_ROLES = ("system", "user", "assistant", "tool")
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")
_ROLE_IN_TEMPLATE = re.compile(r"""role['"\]]*\s*==\s*['"]([A-Za-z_]+)['"]""")


def allowed_roles(tokenizer) -> list[str]:
    named = _ROLE_IN_TEMPLATE.findall(tokenizer.chat_template or "")
    return list(dict.fromkeys([*BASE_ROLES, *named]))


def require_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: the data is conversational (message lists) but the tokenizer has no chat "
            "template; use a chat model's tokenizer or plain-text prompt/completion strings"
        )


def check_messages(messages, where: str, tokenizer) -> list[dict]:
    """Validated copies of the messages (tool-call turns without content get content "")."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages")
    roles = allowed_roles(tokenizer)
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"{where}: message {k} needs a 'role', got {m!r}")
        if m["role"] not in roles:
            raise DataError(
                f"{where}: message {k} has unknown role {m['role']!r} (allowed: {', '.join(roles)})"
            )
        if m.get("content") is None:
            if not (m["role"] == "assistant" and m.get("tool_calls")):
                raise DataError(f"{where}: message {k} ({m['role']}) has no 'content'")
            m = {**m, "content": ""}
        out.append(m)
    return out


class ChatRenderer:
    """Renders one row's chat (text and tokens) with its tools."""

    def __init__(self, tokenizer, where: str, tools=None):
        require_template(tokenizer, where)
        self.tokenizer, self.where, self.tools = tokenizer, where, tools or None

    def text(self, messages: list[dict], gen: bool = False) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(
            messages, tools=self.tools, tokenize=False, add_generation_prompt=gen
        )

    def ids(self, text: str) -> list[int]:
        # as apply_chat_template(tokenize=True): the rendered text, no extra special tokens
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def marked(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        out = self.tokenizer.apply_chat_template(
            messages,
            tools=self.tools,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        return list(out["input_ids"]), list(out["assistant_masks"])


def _is_prefix(short: list, long: list) -> bool:
    return long[: len(short)] == short


_SENTINEL = "\ue000posttrain-turn\ue001"  # private-use characters: in no real message


def _locate_by_sentinel(r: ChatRenderer, messages, i: int, full_text: str):
    """Character span of assistant turn i (content and the template's turn closer) in the full
    render, found by rendering the chat with that turn's content replaced by a sentinel; None
    if the full render does not hold the content verbatim there (the template rewrote it)."""
    alt = [*messages[:i], {**messages[i], "content": _SENTINEL}, *messages[i + 1 :]]
    alt_text = r.text(alt)
    start = alt_text.find(_SENTINEL)
    if start < 0 or full_text[:start] != alt_text[:start]:
        return None
    cut = r.text(alt[: i + 1])
    closer = cut[cut.find(_SENTINEL) + len(_SENTINEL) :]
    expected = messages[i]["content"] + closer
    if not full_text.startswith(expected, start) or not expected:
        return None
    return start, start + len(expected)


def chat_sequences(
    tokenizer, messages, where: str, train_from: int = 0, tools=None
) -> list[tuple[list[int], list[int]]]:
    """[(ids, loss_mask), ...]: the full chat with its locatable assistant turns at index >=
    train_from trained, then one sequence per turn the full render rewrote (see module doc)."""
    messages = check_messages(messages, where, tokenizer)
    r = ChatRenderer(tokenizer, where, tools)
    if _GENERATION.search(tokenizer.chat_template):
        ids, mask = r.marked(messages)
        if train_from > 0:  # only turns of the completion: not those of the prompt
            prompt = r.ids(r.text(messages[:train_from], gen=True))
            if not _is_prefix(prompt, ids):
                raise DataError(f"{where}: the rendered prompt is not a prefix of the chat")
            mask[: len(prompt)] = [0] * len(prompt)
        return [(ids, mask)]

    full_text = r.text(messages)
    encoded = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    full, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    mask = [0] * len(full)
    own: list[tuple[list[int], list[int]]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        before_text, upto_text = r.text(messages[:i], gen=True), r.text(messages[: i + 1])
        before, upto = r.ids(before_text), r.ids(upto_text)
        stable = upto_text.startswith(before_text) and _is_prefix(before, upto)
        if stable and full_text.startswith(upto_text) and _is_prefix(upto, full):
            mask[len(before) : len(upto)] = [1] * (len(upto) - len(before))
        elif span := _locate_by_sentinel(r, messages, i, full_text):
            for t, (a, b) in enumerate(offsets):  # every token overlapping the span
                if b > span[0] and a < span[1]:
                    mask[t] = 1
        elif stable:  # rewritten by a later turn: train it where it is the latest turn
            own.append((upto, [0] * len(before) + [1] * (len(upto) - len(before))))
        else:
            raise DataError(
                f"{where}: assistant turn {i} cannot be located: the chat template renders it "
                "differently in the full chat, and the chat up to it with the generation "
                "prompt is not a prefix of the chat through it"
            )
    return [(full, mask), *own]


def encode_chat(
    tokenizer, messages, where: str, train_from: int = 0, tools=None
) -> tuple[list[int], list[int]]:
    """Exactly one sequence (preference pairs, prompt/completion): a rewritten turn is an error."""
    sequences = chat_sequences(tokenizer, messages, where, train_from, tools)
    if len(sequences) > 1:
        raise DataError(
            f"{where}: the chat template rewrites earlier turns (e.g. Qwen3 drops earlier "
            "<think> blocks), so a trained assistant turn is not where the full chat renders "
            "it; end the row at the assistant turn to train, or use a template with "
            "{% generation %} markers"
        )
    return sequences[0]


def encode_prompt_chat(tokenizer, prompt, where: str, tools=None) -> list[int]:
    messages = check_messages(prompt, where, tokenizer)
    r = ChatRenderer(tokenizer, where, tools)
    return r.ids(r.text(messages, gen=True))
