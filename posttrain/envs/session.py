"""Environments as the multi-turn rollout driver sees them: token ids in, token ids out.

`EnvRunner` (one per trainer) resolves the recipe's environment and tools and makes an
`EnvSession` per sampled conversation. A session renders the conversation with the model's own
chat template (`tools=` the JSON schemas of its tools, data/chat.py's renderer) and turns
each environment reply into the token ids to APPEND to what the policy already has:

    before = render(history + [assistant turn])                       # no generation prompt
    after  = render(history + [assistant turn] + reply, generation prompt)
    reply ids = after[k:]   where k = 1 + the position of the last EOS in `before`

`after[:k]` must equal `before[:k]` (the template is prefix-stable up to the turn's EOS, which
is a special token, so the re-tokenised history cannot merge across it); the turn's own tokens
are never re-tokenised: the cache keeps what the policy sampled. A template that rewrites earlier
turns is a one-line TemplateError.

Failures never stop training: an environment whose `step` raises, outlives
`timeout_s`, or returns something that is not (messages, reward, done) ends that episode with
`failure_reward` (counted in `env/errors`, `env/timeouts`). A timed-out step keeps running in an
abandoned daemon thread (Python cannot kill a thread); while MAX_ABANDONED of them still run,
further steps count as timeouts at once instead of piling up threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from posttrain.data.chat import ChatRenderer
from posttrain.envs.base import make_environment, resolve_environment
from posttrain.envs.tools import resolve_tool, tool_schema
from posttrain.errors import UserError

logger = logging.getLogger(__name__)

MAX_ABANDONED = 8


class TemplateError(UserError, ValueError):
    """The chat template cannot continue a conversation by appending tokens."""


class _Failure(Exception):
    def __init__(self, kind: str, error: BaseException | None = None):
        super().__init__(kind)
        self.kind, self.error = kind, error


class EnvRunner:
    """The recipe's environment, tools and limits; makes one `EnvSession` per sample and keeps
    the counters its metrics report."""

    def __init__(
        self,
        environment: str,
        tokenizer,
        tools: list[str] = (),
        timeout_s: float = 30.0,
        failure_reward: float = 0.0,
        eos_ids: list[int] = (),
    ):
        self.name = environment
        self.cls = resolve_environment(environment)
        self.tokenizer = tokenizer
        self.tools = {_tool_name(t): resolve_tool(t) for t in tools}
        self.timeout_s, self.failure_reward = timeout_s, failure_reward
        self.eos_ids = set(eos_ids) | {tokenizer.eos_token_id}
        self.abandoned: list[threading.Thread] = []
        self.reset_counters()

    def reset_counters(self) -> None:
        self.counts = {"steps": 0, "errors": 0, "timeouts": 0}

    def tools_for(self, row: dict) -> dict[str, Callable]:
        """The recipe's tools plus those named in the row's `tools` column (names or
        module:function strings, or schema dicts naming a recipe tool)."""
        tools = dict(self.tools)
        for entry in row.get("tools") or []:
            name = entry if isinstance(entry, str) else (entry.get("function") or entry).get("name")
            if isinstance(entry, str) and _tool_name(entry) not in tools:
                tools[_tool_name(entry)] = resolve_tool(entry)
            elif name not in tools:
                raise UserError(
                    f"row tool {name!r} is not one of the recipe's tools {sorted(tools)}"
                )
        return tools

    def session(self, row: dict, where: str) -> EnvSession:
        return EnvSession(self, row, where)

    def call(self, fn: Callable, *args):
        """fn(*args) under the step time limit; raises _Failure("errors" | "timeouts")."""
        self.abandoned[:] = [t for t in self.abandoned if t.is_alive()]
        if len(self.abandoned) >= MAX_ABANDONED:
            raise _Failure("timeouts")
        box: dict = {}

        def target() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as error:  # reported to the caller, not lost in the thread
                box["error"] = error

        worker = threading.Thread(target=target, name="posttrain-env", daemon=True)
        worker.start()
        worker.join(self.timeout_s if self.timeout_s > 0 else None)
        if worker.is_alive():
            self.abandoned.append(worker)
            raise _Failure("timeouts")
        if "error" in box:
            raise _Failure("errors", box["error"])
        return box["value"]

    def metrics(self, sessions: list[EnvSession]) -> dict[str, float]:
        """env/* metrics of a rollout's sessions (then the counters start again)."""
        steps = max(self.counts["steps"], 1)
        count = max(len(sessions), 1)
        out = {
            "env/errors": float(self.counts["errors"]),
            "env/timeouts": float(self.counts["timeouts"]),
            "env/failure_rate": (self.counts["errors"] + self.counts["timeouts"]) / steps,
            "env/turns": sum(s.turns for s in sessions) / count,
            "env/tool_calls": sum(s.tool_messages for s in sessions) / count,
            "env/reward_mean": sum(s.reward for s in sessions) / count,
        }
        self.reset_counters()
        return out


def _tool_name(name: str) -> str:
    return name.rpartition(":")[2]


class EnvSession:
    """One conversation: the environment instance, its chat history and its reward."""

    def __init__(self, runner: EnvRunner, row: dict, where: str):
        self.runner, self.where = runner, where
        tools = runner.tools_for(row)
        self.renderer = ChatRenderer(
            runner.tokenizer, where, [tool_schema(fn) for fn in tools.values()] or None
        )
        self.env = make_environment(runner.cls, tools)
        try:
            messages = runner.call(self.env.reset, dict(row))
        except _Failure as failure:
            raise UserError(
                f"{where}: environment {runner.name!r} reset failed ({failure.kind}: "
                f"{failure.error!r})"
            ) from failure.error
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: environment {runner.name!r} reset returned no messages")
        self.messages = [dict(m) for m in messages]
        self.prompt_ids = self.renderer.ids(self.renderer.text(self.messages, gen=True))
        self.reward = 0.0
        self.turns = 0
        self.tool_messages = 0
        self.final_text = ""
        self.failed = False

    def step(self, turn_ids: list[int], eos: bool) -> list[int] | None:
        """The token ids the environment's reply adds after this turn, or None: episode over."""
        self.turns += 1
        text = self.runner.tokenizer.decode(turn_ids, skip_special_tokens=True)
        self.final_text = text
        if not eos:  # cut off by max_new_tokens: no message to give the environment
            return None
        message = {"role": "assistant", "content": text}
        self.runner.counts["steps"] += 1
        try:
            result = self.runner.call(self.env.step, dict(message))
            reply, reward, done = result
            if reward is not None:
                reward = float(reward)
            reply = [dict(m) for m in reply or []]
        except _Failure as failure:
            return self._fail(failure.kind, failure.error)
        except (TypeError, ValueError) as error:  # not (messages, reward, done)
            return self._fail("errors", error)
        self.reward += reward or 0.0
        self.messages.append(message)
        if done:
            return None
        self.tool_messages += sum(m.get("role") == "tool" for m in reply)
        return self._reply_ids(reply)

    def _fail(self, kind: str, error: BaseException | None) -> None:
        self.runner.counts[kind] += 1
        if not self.failed:
            logger.warning(
                "environment %r step %s in %s: %r (the episode ends with failure_reward=%s)",
                self.runner.name,
                "timed out" if kind == "timeouts" else "failed",
                self.where,
                error,
                self.runner.failure_reward,
            )
        self.failed = True
        self.reward = self.runner.failure_reward
        return None

    def _reply_ids(self, reply: list[dict]) -> list[int]:
        r = self.renderer
        before = r.ids(r.text(self.messages, gen=False))
        self.messages.extend(reply)
        after = r.ids(r.text(self.messages, gen=True))
        ends = [i for i, token in enumerate(before) if token in self.runner.eos_ids]
        cut = ends[-1] + 1 if ends else len(before)
        if after[:cut] != before[:cut]:
            raise TemplateError(
                f"{self.where}: the chat template renders the conversation differently once the "
                "environment's reply is added (it rewrites earlier turns), so the reply cannot be "
                "appended to the tokens already sampled; use a prefix-stable template"
            )
        return after[cut:]
