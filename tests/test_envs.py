"""Environments and tools (posttrain/envs, data/tools.py): failing and hanging environments are
survived and counted, tool calls are parsed and run with a time limit, the environment's reply
is appended as the chat template renders it, and the bundled task is consistent."""

from __future__ import annotations

import json
import threading
import time
import warnings

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.data.tools import calculator, format_tool_call, make_tools, parse_tool_call
from posttrain.envs import EnvRunner
from posttrain.envs.base import EnvironmentSpecError, resolve_environment
from posttrain.envs.rollouts import environment_rollout
from posttrain.envs.tool_env import ToolEnvironment
from posttrain.envs.tools import ToolError, call_tool, resolve_tool
from posttrain.rollout import SamplingParams

RELEASE = threading.Event()  # lets the hanging environment's abandoned threads finish


class FlakyEnv:
    """Raises on every third step (a third of all steps), else asks for one more turn."""

    calls = 0

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, message):
        FlakyEnv.calls += 1
        if FlakyEnv.calls % 3 == 0:
            raise RuntimeError("the verifier crashed")
        return [{"role": "user", "content": "go on"}], 1.0, False


class HangingEnv:
    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, message):
        RELEASE.wait(30)
        return [], 1.0, True


class BadReturnEnv:
    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, message):
        return "not a tuple"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def turn(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_an_environment_raising_on_a_third_of_the_steps_is_survived_and_counted(tokenizer):
    FlakyEnv.calls = 0
    runner = EnvRunner("test_envs:FlakyEnv", tokenizer, failure_reward=-1.0)
    sessions = [runner.session({"prompt": f"q{i}"}, f"row {i}") for i in range(6)]
    ended = []
    for _ in range(3):  # three rounds: steps 3, 6, 9, ... raise
        for s in sessions:
            if s in ended:
                continue
            if s.step(turn(tokenizer, "7"), eos=True) is None:
                ended.append(s)
    metrics = runner.metrics(sessions)
    assert FlakyEnv.calls == 13  # 6 + 4 + 3 steps: each round a third of the steps raised
    assert metrics["env/errors"] == 4 and metrics["env/timeouts"] == 0
    assert metrics["env/failure_rate"] == pytest.approx(4 / 13)
    failed = [s for s in sessions if s.failed]
    assert len(failed) == 4 and all(s.reward == -1.0 for s in failed)  # failure_reward
    assert sorted(s.reward for s in sessions if not s.failed) == [3.0, 3.0]
    assert runner.metrics(sessions)["env/errors"] == 0  # counters start again per rollout


def test_a_hanging_environment_times_out_and_is_counted(tokenizer):
    RELEASE.clear()
    runner = EnvRunner("test_envs:HangingEnv", tokenizer, timeout_s=0.2, failure_reward=0.0)
    sessions = [runner.session({"prompt": "q"}, f"row {i}") for i in range(3)]
    started = time.perf_counter()
    replies = [s.step(turn(tokenizer, "1"), eos=True) for s in sessions]
    waited = time.perf_counter() - started
    RELEASE.set()
    assert replies == [None, None, None]
    metrics = runner.metrics(sessions)
    assert metrics["env/timeouts"] == 3 and metrics["env/errors"] == 0
    assert waited < 10  # abandoned, not waited for (30 s each)
    assert all(s.reward == 0.0 for s in sessions)


def test_a_step_returning_garbage_counts_as_an_error(tokenizer):
    runner = EnvRunner("test_envs:BadReturnEnv", tokenizer, failure_reward=-2.0)
    session = runner.session({"prompt": "q"}, "row 1")
    assert session.step(turn(tokenizer, "1"), eos=True) is None
    assert runner.counts["errors"] == 1 and session.reward == -2.0


def test_flaky_environment_through_the_rollout_driver(tiny_model_dir, tokenizer):
    FlakyEnv.calls = 0
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.generation_config.eos_token_id = list(range(0, len(tokenizer), 4))
    runner = EnvRunner("test_envs:FlakyEnv", tokenizer, failure_reward=-1.0)
    rows = [{"prompt": f"What is {i} + 1?"} for i in range(4)]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=0)
    rollout, sessions, _ = environment_rollout(
        model, tokenizer, runner, rows, params, 4, [1, 2, 3, 4], "rows"
    )
    assert len(rollout) == 8 and rollout.env_mask is not None
    metrics = runner.metrics(sessions)
    assert metrics["env/errors"] == FlakyEnv.calls // 3 > 0


def test_tool_call_parsing():
    text = "let me see " + format_tool_call("calculator", {"expression": "12*34"}) + " ok"
    assert parse_tool_call(text) == ("calculator", {"expression": "12*34"})
    spaced = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'  # Hermes layout
    assert parse_tool_call(spaced) == ("f", {"x": 1})
    assert parse_tool_call("42") is None
    assert parse_tool_call("<tool_call>{oops</tool_call>").startswith("error: ")
    assert parse_tool_call('<tool_call>{"arguments": {}}</tool_call>').startswith("error: ")
    assert parse_tool_call('<tool_call>{"name": "f", "arguments": 3}</tool_call>').startswith(
        "error: "
    )


def test_calculator_and_time_limited_tools():
    assert calculator("1234*567") == str(1234 * 567)
    assert calculator("(2 + 3) * -4") == "-20"
    assert calculator("7/2") == "3.5"
    with pytest.raises(ValueError):
        calculator("__import__('os').system('true')")
    # a model's "2or 3" is a tool error for the episode, not a SyntaxWarning on stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError):
            calculator("2or 3")
    assert call_tool(calculator, {"expression": "6*7"}, 1.0) == ("42", "ok")
    text, outcome = call_tool(calculator, {"expression": "open('x')"}, 1.0)
    assert outcome == "error" and text.startswith("error: ValueError")
    text, outcome = call_tool(lambda: time.sleep(5), {}, 0.1)
    assert outcome == "timeout" and "did not answer" in text
    assert resolve_tool("python")("print(6 * 7)") == "42"  # code tools run in the sandbox


def test_unknown_names_are_one_line_errors():
    with pytest.raises(ToolError, match="unknown tool 'abacus'"):
        resolve_tool("abacus")
    with pytest.raises(EnvironmentSpecError, match="unknown environment 'gym'"):
        resolve_environment("gym")
    with pytest.raises(EnvironmentSpecError, match="cannot import"):
        resolve_environment("no_such_module:Env")


def test_tool_environment_runs_the_call_and_ends_on_an_answer():
    env = ToolEnvironment(tools={"calculator": calculator})
    assert env.reset({"prompt": "What is 2 * 3?"}) == [
        {"role": "user", "content": "What is 2 * 3?"}
    ]
    call = {"role": "assistant", "content": format_tool_call("calculator", {"expression": "2*3"})}
    assert env.step(call) == ([{"role": "tool", "name": "calculator", "content": "6"}], None, False)
    unknown = {"role": "assistant", "content": format_tool_call("abacus", {})}
    (reply,), reward, done = env.step(unknown)
    assert "unknown tool 'abacus'" in reply["content"] and not done
    assert env.step({"role": "assistant", "content": "6"}) == ([], None, True)


def test_reply_tokens_continue_the_rendered_conversation(tokenizer):
    runner = EnvRunner("tools", tokenizer, tools=["calculator"])
    row = {"prompt": [{"role": "user", "content": "What is 12 * 34?"}], "answer": "408"}
    session = runner.session(row, "row 1")
    prompt_text = tokenizer.decode(session.prompt_ids)
    assert prompt_text.startswith("<|bos|><|system|>tools: calculator<|end|><|user|>")
    call = format_tool_call("calculator", {"expression": "12*34"})
    turn_ids = turn(tokenizer, call)
    reply = session.step(turn_ids, eos=True)
    assert tokenizer.decode(reply) == "<|tool|>408<|end|><|assistant|>"
    # prompt + sampled turn + reply is exactly the template's render of the conversation
    messages = [*row["prompt"], {"role": "assistant", "content": call}]
    messages.append({"role": "tool", "name": "calculator", "content": "408"})
    rendered = tokenizer.apply_chat_template(
        messages, tools=[runner.tools["calculator"]], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert session.prompt_ids + turn_ids + reply == ids
    assert session.step(turn(tokenizer, "408"), eos=True) is None
    assert session.final_text == "408" and session.tool_messages == 1


def test_a_rows_tools_column_is_honoured(tokenizer):
    runner = EnvRunner("tools", tokenizer)  # the recipe names no tool
    session = runner.session({"prompt": "What is 2 * 3?", "tools": ["calculator"]}, "row 1")
    assert "tools: calculator" in tokenizer.decode(session.prompt_ids)
    call = turn(tokenizer, format_tool_call("calculator", {"expression": "2*3"}))
    assert tokenizer.decode(session.step(call, eos=True)) == "<|tool|>6<|end|><|assistant|>"


def test_the_bundled_tool_task(tmp_path):
    counts = make_tools(tmp_path, n=50, n_test=10, seed=1)
    assert counts == {
        "tools_sft_train.jsonl": 50,
        "tools_rl_train.jsonl": 50,
        "tools_sft_test.jsonl": 10,
        "tools_rl_test.jsonl": 10,
    }
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    test_questions = {r["prompt"][0]["content"] for r in read("tools_rl_test.jsonl")}
    train_questions = {r["prompt"][0]["content"] for r in read("tools_rl_train.jsonl")}

    def operands(question: str) -> tuple[int, ...]:
        return tuple(
            int(t) for t in question.replace("?", " ").replace(".", " ").split() if t.isdigit()
        )

    assert not {operands(q) for q in test_questions} & {operands(q) for q in train_questions}
    for row in read("tools_sft_train.jsonl"):
        user, call, result, answer = row["messages"]
        name, arguments = parse_tool_call(call["content"])
        assert (
            name == "calculator"
            and calculator(**arguments) == result["content"] == answer["content"]
        )
        assert row["tools"][0]["function"]["name"] == "calculator"
