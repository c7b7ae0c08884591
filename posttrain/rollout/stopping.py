"""Stop strings: detecting them while decoding, and cutting the decoded text at them.

A row stops at the token that completes a stop string; that token and the ones before it stay
in the completion mask (the policy did choose them), and the row's text ends with the stop
string: anything the same token decodes to after it is cut away.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cut_at_stop(text: str, stop: list[str]) -> str:
    """Text up to and including the earliest-ending stop string (the mask keeps its tokens)."""
    ends = [text.find(s) + len(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text


class StopChecker:
    """Stop-string detection on the decoded tail of each row.

    A stop string of b UTF-8 bytes spans at most b tokens (every non-special token decodes to
    at least one byte), so decoding the last b + 2 tokens sees any stop string completed by the
    newest token; the two extra tokens keep tokenizers that drop a leading space at the start
    of a decode (SentencePiece) from hiding a stop string that begins with a space.
    """

    def __init__(self, tokenizer, stop: list[str], rows: int):
        self.tokenizer = tokenizer
        self.stop = stop
        self.window = max(len(s.encode("utf-8")) for s in stop) + 2
        self.history: list[list[int]] = [[] for _ in range(rows)]

    def update(self, active: Tensor, next_tokens: Tensor, done: Tensor) -> Tensor:
        """Append the new tokens; (A,) bool: the row's tail now contains a stop string."""
        rows, new, finished = active.tolist(), next_tokens.tolist(), done.tolist()
        tails = []
        for row, token in zip(rows, new, strict=True):
            self.history[row].append(token)
            tails.append(self.history[row][-self.window :])
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        hit = [
            not f and any(s in t for s in self.stop) for t, f in zip(texts, finished, strict=True)
        ]
        return torch.tensor(hit, dtype=torch.bool)
