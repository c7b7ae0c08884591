"""A learnt reward model used as a reward function (spec §4 models, scored as in §6 PPO/RLHF).

`RewardModelScorer(path)` loads any sequence-classification checkpoint (a Bradley-Terry reward
model trained by `posttrain`, or any causal-LM checkpoint, whose fresh head is then random) with
`AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)` and scores each
prompt + completion with one scalar.

Rendering: a chat prompt (a list of messages) goes through the tokenizer's chat template with
the completion appended as an assistant message; a string prompt is concatenated with the
completion and tokenised with the tokenizer's special tokens.

Pooling: transformers reads the head at the rightmost token that is not `config.pad_token_id`,
so the config's pad id is set from the tokenizer when missing (and the tokenizer falls back to
EOS as pad). Batches are right-padded, so padding never changes a row's score.
Deliberate choices: texts longer than `max_length` tokens are cut on the LEFT, because the
score is read at the end of the completion; batches are formed from length-sorted texts to
waste little compute on padding.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class RewardModelScorer:
    """Reward function `(prompts, completions, **columns) -> list[float]` backed by a reward model."""

    def __init__(
        self,
        path: str,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        max_length: int = 1024,
        trust_remote_code: bool = False,
    ):
        self.path = str(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.path, trust_remote_code=trust_remote_code
        )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.path, num_labels=1, trust_remote_code=trust_remote_code
        )
        for config in {
            id(c): c for c in (self.model.config, self.model.config.get_text_config())
        }.values():
            if config.pad_token_id is None:
                config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.__name__ = f"reward_model({self.path})"

    def render(self, prompt, completion: str) -> str:
        """The text the reward model reads: chat template for message lists, else concatenation."""
        if isinstance(prompt, str):
            return prompt + completion
        messages = [*prompt, {"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def _encode(self, prompt, completion: str) -> list[int]:
        text = self.render(prompt, completion)
        # A chat template already writes the special tokens (BOS etc.); plain text gets them here.
        encoded = self.tokenizer(
            text,
            add_special_tokens=isinstance(prompt, str),
            truncation=True,
            max_length=self.max_length,
        )
        return encoded["input_ids"]

    @torch.inference_mode()
    def __call__(self, prompts: list, completions: list[str], **columns) -> list[float]:
        token_ids = [self._encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        scores = [0.0] * len(token_ids)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = self.tokenizer.pad(
                {"input_ids": [token_ids[i] for i in rows]}, padding=True, return_tensors="pt"
            ).to(self.device)
            logits = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            for row, score in zip(
                rows, logits[:, 0].float().tolist(), strict=True
            ):  # (B, 1) -> (B,)
                scores[row] = score
        return scores
