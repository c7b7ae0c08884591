"""A small byte-level BPE tokenizer built locally with `tokenizers`, with a chat template.

Nothing can be downloaded here, so tests and the demo need a tokenizer that is made on the
machine yet behaves like a real Hugging Face one: it is saved with `save_pretrained` and read
back with `AutoTokenizer.from_pretrained`, exactly the path a user's checkpoint takes.

Design choices (and why):
- Byte-level pre-tokenisation, so any text encodes (no <unk>).
- Digits are split one by one, so arithmetic is learnable: "123" is always 1|2|3.
- The chat template is prefix-stable: rendering messages[:i] with a generation prompt gives a
  token prefix of rendering messages[:i+1]. The SFT masking relies on that (it is checked).
- `<|end|>` closes every turn and is the EOS token, so generation stops at the end of the
  assistant's turn.
- `tools=` renders a one-line system turn naming the tools (multi-turn tool use, envs/).
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, END = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, END, *ROLE_TOKENS]

# `{% generation %}` marks assistant content for transformers' assistant-token masks; the
# posttrain SFT path does not need it (it diffs prefix renders) but users' tools may.
# With `tools=` (JSON schemas), a system turn lists the tool names before the chat: the tiny
# model only needs to know which calls exist (the call format is learnt from tool-use SFT data,
# data/tools.py); a `tool` message renders as `<|tool|>` + its content, like any role.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>tools:' }}{% for tool in tools %}"
    "{{ ' ' + (tool.function if tool.function is defined else tool).name }}{% endfor %}"
    "{{ '<|end|>' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_WORDS = (
    "what is the sum of and plus minus equals answer question compute please solve think "
    "result number total add together give me a short reply let us find value here "
    "calculate quick check first then so we get final it this that for with to of in on"
).split()


def _training_corpus(seed: int = 0, n_lines: int = 4000) -> list[str]:
    """Text the BPE merges are learnt from: arithmetic prompts plus common English words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        lines.append(f"{words.capitalize()}. What is {a} + {b}? <answer>{a + b}</answer>")
    return lines


def build_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on a generated corpus and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        padding_side="right",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
