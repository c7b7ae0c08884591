"""Environments the multi-turn tests name as `tests.multiturn_envs:Class` in recipes run by the
CLI (a module of its own: the CLI process imports it without pytest's test helpers)."""

from __future__ import annotations


class ChattyEnv:
    """Answers every turn until max_turns cuts the episode; rewards long first turns a bit."""

    def reset(self, row):
        self.turn = 0
        return row["prompt"]

    def step(self, message):
        self.turn += 1
        reward = 0.1 * min(len(message["content"]), 10) if self.turn == 1 else None
        return [{"role": "user", "content": f"and then {self.turn}?"}], reward, False
