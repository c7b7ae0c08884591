"""Assistant masks under real families' chat templates (tests/chat_templates.py), on a real
151,646-token Qwen2 BPE tokenizer: every assistant turn is trained, no system, user or tool text
is, for multi-turn, system and tool-call conversations; history-rewriting templates (Qwen3)
train each rewritten turn in its own context instead of marking the wrong tokens."""

from __future__ import annotations

import json

import pytest
from chat_templates import TEMPLATES, build_qwen_tokenizer

from posttrain.data.chat import chat_sequences
from posttrain.data.encoding import encode_prompt_completion
from posttrain.data.loading import DataError

SYSTEM_CHAT = [
    {"role": "system", "content": "Be brief sysword."},
    {"role": "user", "content": "First userword one?"},
    {"role": "assistant", "content": "Reply alpha."},
    {"role": "user", "content": "Second userword two?"},
    {"role": "assistant", "content": "Reply bravo."},
]
THINK_CHAT = [
    {"role": "user", "content": "First userword one?"},
    {"role": "assistant", "content": "<think>\nreason charlie\n</think>\n\nReply alpha."},
    {"role": "user", "content": "Second userword two?"},
    {"role": "assistant", "content": "<think>\nreason delta\n</think>\n\nReply bravo."},
]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Add userword please?"},
    {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}],
    },
    {"role": "tool", "content": "toolword 3"},
    {"role": "assistant", "content": "Reply bravo."},
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_qwen_tokenizer(tmp_path_factory.mktemp("qwen")))


def _trained_texts(tok, sequences) -> list[str]:
    out = []
    for ids, mask in sequences:
        assert len(ids) == len(mask)
        out.append(tok.decode([t for t, m in zip(ids, mask, strict=True) if m]))
    return out


def _with_template(tok, name):
    tok.chat_template = TEMPLATES[name]
    return tok


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_multi_turn_with_system_masks_assistant_turns_only(qwen, name):
    tok = _with_template(qwen, name)
    trained = " ".join(_trained_texts(tok, chat_sequences(tok, SYSTEM_CHAT, "row 1")))
    assert "alpha" in trained and "bravo" in trained
    for word in ("sysword", "userword", "First", "Second"):
        assert word not in trained, (name, trained)


@pytest.mark.parametrize("name", ["llama3", "chatml", "qwen3", "generation"])
def test_tool_turns(qwen, name):
    tok = _with_template(qwen, name)
    seqs = chat_sequences(tok, TOOL_CHAT, "row 1", tools=TOOLS)
    trained = " ".join(_trained_texts(tok, seqs))
    assert "bravo" in trained and "toolword" not in trained and "userword" not in trained
    if name != "generation":  # its template renders no tool calls
        assert '"add"' in trained  # the tool call itself is an assistant target


def test_tools_reach_the_template(qwen):
    tok = _with_template(qwen, "chatml")
    (ids, _), *_ = chat_sequences(tok, TOOL_CHAT, "row 1", tools=TOOLS)
    assert "# Tools" in tok.decode(ids)


def test_qwen3_rewritten_think_turn_is_trained_in_its_own_context(qwen):
    """Qwen3 drops turn 1's <think> block once a later user turn exists: in the full chat the
    turn reads "Reply alpha." and the think text is nowhere; so turn 1 with its reasoning is
    its own sequence, and the second user turn is never a target (it was, before)."""
    tok = _with_template(qwen, "qwen3")
    seqs = chat_sequences(tok, THINK_CHAT, "row 1")
    texts = _trained_texts(tok, seqs)
    full_text = tok.decode(seqs[0][0])
    assert "charlie" not in full_text  # history rewritten
    assert "delta" in texts[0] and "bravo" in texts[0]
    assert any("charlie" in t and "alpha" in t for t in texts[1:])
    for t in texts:
        assert "userword" not in t and "Second" not in t


def test_qwen3_latest_turn_gets_its_empty_think_block(qwen):
    tok = _with_template(qwen, "qwen3")
    chat = [dict(m) for m in SYSTEM_CHAT]
    seqs = chat_sequences(tok, chat, "row 1")
    texts = _trained_texts(tok, seqs)
    assert all("userword" not in t for t in texts)
    assert "alpha" in " ".join(texts) and "bravo" in texts[0]


def test_preference_pair_with_rewritten_turn_is_an_error_naming_the_row(qwen):
    tok = _with_template(qwen, "qwen3")
    with pytest.raises(DataError, match=r"pairs\.jsonl: row 3.*rewrites earlier turns"):
        encode_prompt_completion(tok, THINK_CHAT[:1], THINK_CHAT[1:], "pairs.jsonl: row 3")


def test_unknown_role_names_file_row_and_allowed_roles(tiny_model_dir, tmp_path):
    from posttrain.algorithms.sft import encode_sft_file
    from posttrain.models.loading import load_tokenizer

    path = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tok = load_tokenizer(str(tiny_model_dir))
    with pytest.raises(DataError) as err:
        encode_sft_file(tok, str(path), "auto", 64)
    msg = str(err.value)
    assert str(path) in msg and "row 2" in msg and "'robot'" in msg
    assert "allowed: system, user, assistant, tool" in msg


def test_assistant_tool_call_without_content_is_accepted_but_user_without_is_not(qwen):
    tok = _with_template(qwen, "chatml")
    chat_sequences(tok, TOOL_CHAT, "row 1", tools=TOOLS)
    with pytest.raises(DataError, match="row 4: message 0 \\(user\\) has no 'content'"):
        chat_sequences(tok, [{"role": "user"}], "row 4")


def test_real_tokenizer_conventions(qwen):
    """Qwen ships no pad and no bos token; the loader pads with EOS (<|im_end|>)."""
    assert len(qwen) == 151646 and qwen.bos_token is None and qwen.pad_token is None
    assert qwen("Hello world")["input_ids"] == [9707, 1879]
