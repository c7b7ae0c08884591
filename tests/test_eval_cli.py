"""General evaluation: `posttrain eval` with exact match (two match rules), the user's reward
functions, token loss and pass@K, and the recipe's `evaluation` section during training.

Every number is checked against a recomputation from the same model outside posttrain's eval
code (the RolloutEngine's greedy or seeded samples, a plain forward), on rows built so that the
expected value is known (half the references equal the model's own greedy completion)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from cli_helpers import run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import ConfigError, RewardFunctionConfig, from_dict
from posttrain.evaluation import build_periodic_eval, evaluate_model, exact_string_match
from posttrain.rollout import RolloutEngine, SamplingParams
from posttrain.scoring.answers import is_correct

MAX_NEW = 6
REWARD_MODULE = '''
def length_and_answer(prompts, completions, answer, **columns):
    """Completion length / 10, plus 1 when the reference appears in the completion."""
    return [len(c) / 10 + (1.0 if str(a) in c else 0.0) for c, a in zip(completions, answer)]
'''


def _user_reward(completions, answers):
    return [len(c) / 10 + (1.0 if str(a) in c else 0.0) for c, a in zip(completions, answers)]


@pytest.fixture(scope="module")
def model_and_engine(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer, RolloutEngine(model, tokenizer)


@pytest.fixture(scope="module")
def half_right(model_and_engine, arithmetic_dir, tmp_path_factory):
    """8 prompt/answer rows; rows 0, 2, 4, 6 have the model's own greedy completion as answer."""
    _, _, engine = model_and_engine
    rows = [json.loads(line) for line in open(arithmetic_dir / "rl_test.jsonl")][:8]
    prompts = [r["prompt"] for r in rows]
    greedy = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=MAX_NEW))
    for i, row in enumerate(rows):
        row["answer"] = greedy.texts[i] if i % 2 == 0 else greedy.texts[i] + " not this"
    path = tmp_path_factory.mktemp("eval") / "half.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows, greedy.texts


def test_match_rules():
    assert is_correct("so the sum is 42.", "42") and not exact_string_match(
        "so the sum is 42.", "42"
    )
    assert is_correct("<answer>1,000</answer>", "1000.0") and is_correct("\\boxed{3/4}", "0.75")
    assert exact_string_match(" 42\n", "42") and not exact_string_match("42.0", "42")


def test_exact_match_exact_rule_counts_half(tiny_model_dir, half_right):
    path, _, _ = half_right
    result = evaluate_model(str(tiny_model_dir), str(path), MAX_NEW, match="exact")
    assert result["accuracy"] == 0.5 and result["n"] == 8 and result["metric"] == "exact_match"


def test_reward_metric_equals_the_function_on_greedy_completions(
    tiny_model_dir, half_right, tmp_path
):
    """Through the CLI with a user's module:function: the mean equals the function applied to
    the engine's greedy completions with the rows' answers."""
    path, rows, greedy = half_right
    (tmp_path / "my_eval_rewards.py").write_text(REWARD_MODULE)
    done = run_cli(
        "eval",
        str(tiny_model_dir),
        str(path),
        "--reward",
        "my_eval_rewards:length_and_answer",
        "--max-new-tokens",
        str(MAX_NEW),
        env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    expected = _user_reward(greedy, [r["answer"] for r in rows])
    assert result["metric"] == "reward"
    assert result["reward"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    assert result["rewards/my_eval_rewards:length_and_answer"] == pytest.approx(result["reward"])


def test_pass_at_k_equals_recomputed_samples(
    tiny_model_dir, half_right, model_and_engine, tmp_path, monkeypatch
):
    """pass@K with the reward metric: a sample succeeds at reward >= the threshold, here the
    median sample reward, so some groups have a success and some samples fail."""
    path, rows, _ = half_right
    _, _, engine = model_and_engine
    (tmp_path / "my_eval_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    k, seed = 4, 7
    sampled = engine.generate(
        [r["prompt"] for r in rows],
        SamplingParams(n=k, temperature=1.0, max_new_tokens=MAX_NEW, seed=seed),
    )
    answers = [rows[g]["answer"] for g in sampled.group_ids.tolist()]
    rewards = torch.tensor(_user_reward(sampled.texts, answers)).view(len(rows), k)
    threshold = float(rewards.median())
    success = rewards >= threshold
    assert success.any(1).float().mean() > success.all(1).float().mean()  # the test can tell
    result = evaluate_model(
        str(tiny_model_dir),
        str(path),
        MAX_NEW,
        samples=k,
        seed=seed,
        metric="reward",
        rewards=[RewardFunctionConfig(name="my_eval_rewards:length_and_answer")],
        success_threshold=threshold,
    )
    assert result[f"pass@{k}"] == pytest.approx(float(success.any(1).float().mean()))
    assert result["sample_reward"] == pytest.approx(float(rewards.mean()), abs=1e-6)


def test_pass_at_k_exact_match(tiny_model_dir, half_right):
    """Sampled completions at temperature 1 rarely repeat the greedy one; pass@K >= the sample
    mean, and greedy accuracy is unchanged by sampling."""
    path, _, _ = half_right
    result = evaluate_model(str(tiny_model_dir), str(path), MAX_NEW, samples=3, match="exact")
    assert result["accuracy"] == 0.5 and result["pass@3"] >= result["sample_accuracy"]


def test_loss_metric_equals_a_plain_forward(tiny_model_dir, model_and_engine, tmp_path):
    """Mean NLL over every token of `text` rows (EOS appended), by hand: padding and batching
    must not change it."""
    model, tokenizer, _ = model_and_engine
    texts = ["12 + 30 = 42", "a longer line of text to score, with more tokens in it", "7"]
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        logp = torch.log_softmax(logits.float(), -1)
        nll -= float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
        count += len(ids) - 1
    for batch_size in (1, 3):
        result = evaluate_model(
            str(tiny_model_dir), str(path), metric="loss", batch_size=batch_size
        )
        assert result["tokens"] == count
        assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_chat_rows_give_prompt_and_reference(tiny_model_dir, arithmetic_dir):
    """sft_*.jsonl (messages): the reference is the last assistant message; the tiny random
    model is never right, and the row count is that of the file."""
    result = evaluate_model(str(tiny_model_dir), str(arithmetic_dir / "sft_test.jsonl"), 4, limit=5)
    assert result["n"] == 5 and result["accuracy"] == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "reward"}, "--metric reward needs at least one --reward"),
        ({"metric": "bleu"}, "--metric 'bleu': expected one of exact_match, reward, loss"),
        ({"match": "fuzzy"}, "--match 'fuzzy': expected one of answer, exact"),
    ],
)
def test_eval_option_errors(tiny_model_dir, arithmetic_dir, kwargs, message):
    with pytest.raises(ConfigError) as error:
        evaluate_model(str(tiny_model_dir), str(arithmetic_dir / "rl_test.jsonl"), **kwargs)
    assert str(error.value) == message or message in str(error.value)


def test_eval_bad_reward_is_one_line(tiny_model_dir, arithmetic_dir):
    done = run_cli(
        "eval",
        str(tiny_model_dir),
        str(arithmetic_dir / "rl_test.jsonl"),
        "--reward",
        "no_such_module:f",
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_module" in lines[0], lines


def test_training_evaluation_section_uses_the_users_reward(
    tiny_model_dir, arithmetic_dir, tmp_path, monkeypatch
):
    """SFT with `evaluation.metric: reward` and a user's function: eval/reward at the last step
    equals `posttrain eval` of final/ with the same function and rows."""
    (tmp_path / "my_eval_rewards.py").write_text(REWARD_MODULE)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "run"
    eval_path = arithmetic_dir / "sft_test.jsonl"
    done = run_cli(
        "sft",
        "recipes/sft_tiny.yaml",
        f"model.name_or_path={tiny_model_dir}",
        f"data.train_path={arithmetic_dir / 'sft_train.jsonl'}",
        f"data.eval_path={eval_path}",
        "data.max_eval_examples=6",
        f"train.output_dir={out}",
        "train.max_steps=2",
        "train.batch_size=8",
        "train.save_every=0",
        "logging.progress=false",
        "evaluation.metric=reward",
        "evaluation.rewards=[{name: 'my_eval_rewards:length_and_answer'}]",
        f"evaluation.max_new_tokens={MAX_NEW}",
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "eval/loss" in last  # the algorithm's own eval still runs
    monkeypatch.syspath_prepend(str(tmp_path))
    result = evaluate_model(
        str(out / "final"),
        str(eval_path),
        MAX_NEW,
        limit=6,
        metric="reward",
        rewards=[RewardFunctionConfig(name="my_eval_rewards:length_and_answer")],
    )
    assert last["eval/reward"] == pytest.approx(result["reward"], abs=1e-6)
    assert last["eval/reward"] > 0


def test_evaluation_section_errors(arithmetic_dir):
    from posttrain.algorithms import ALGORITHMS

    sft = ALGORITHMS["sft"][0]

    def build(evaluation: dict, eval_path: str = "", algorithm: str = "sft"):
        cfg = from_dict(sft, {"data": {"eval_path": eval_path}, "evaluation": evaluation})
        return build_periodic_eval(cfg, algorithm)

    assert build({}) is None  # metric default: nothing more to run
    with pytest.raises(ConfigError, match="evaluation.metric=reward needs data.eval_path"):
        build({"metric": "reward"})
    rl_test = str(arithmetic_dir / "rl_test.jsonl")
    with pytest.raises(ConfigError, match="needs evaluation.rewards"):
        build({"metric": "reward"}, rl_test)
    with pytest.raises(ConfigError, match="a reward model does not generate"):
        build({"metric": "exact_match"}, rl_test, "rm")
    kto_test = str(arithmetic_dir / "kto_test.jsonl")  # prompt + completion: its reference
    assert build({"metric": "exact_match", "samples": 3}, kto_test).keys == [
        "n", "accuracy", "pass@3", "sample_accuracy"
    ]  # fmt: skip
