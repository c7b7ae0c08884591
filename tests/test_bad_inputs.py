"""Issue 14: every foreseeable user mistake is one line on stderr naming the culprit, exit status
2 and no traceback; a reward that never returns does not hang training; text stays text.

Most cases run the typer app in this process (CliRunner: no interpreter start, ~1 s each); the
ones that depend on a fresh process (the console script's sys.path, a file-size limit, a full
disk) run a subprocess. Every case here fails on 4d721e5, the commit before this module.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_helpers import REPO, sft_overrides


def run_inprocess(*args, env: dict | None = None):
    """The typer app in this process; returns an object shaped like CompletedProcess."""
    from typer.testing import CliRunner

    from posttrain.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return SimpleNamespace(returncode=result.exit_code, stderr=result.stderr, stdout=result.stdout)


def run_script(*args, cwd: Path, env: dict | None = None, preexec=None):
    """The installed `posttrain` console script, as a user runs it from `cwd`."""
    script = Path(sys.executable).parent / "posttrain"
    return subprocess.run(
        [str(script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        preexec_fn=preexec,
        timeout=600,
    )


def check_error(result, *fragments):
    """Exit 2, no traceback, exactly one `error:` line holding every fragment. (Libraries may
    print warnings of their own before it, e.g. accelerate on tied weights.)"""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    line = errors[0]
    after = result.stderr[result.stderr.index(line) + len(line) :]
    assert not after.strip(), f"more after the error line: {after!r}"
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


@pytest.fixture()
def sft(tiny_model_dir, arithmetic_dir, tmp_path):
    """`posttrain sft recipes/sft_tiny.yaml` made tiny, with extra overrides."""

    def run(*extra):
        base = sft_overrides(tiny_model_dir, arithmetic_dir, tmp_path / "out")
        return run_inprocess("sft", REPO / "recipes/sft_tiny.yaml", *base, *extra)

    return run


def rl_args(model_dir, data_dir, out, rewards: str, *extra) -> list[str]:
    values = {
        "model.name_or_path": model_dir,
        "data.train_path": data_dir / "rl_train.jsonl",
        "data.eval_path": "",
        "train.output_dir": out,
        "train.max_steps": 2,
        "train.batch_size": 8,
        "grpo.prompts_per_step": 2,
        "grpo.num_generations": 4,
        "grpo.max_new_tokens": 4,
        "grpo.rewards": rewards,
        "logging.log_every": 1,
        "logging.progress": False,
    }
    return [f"{k}={v}" for k, v in values.items()] + list(extra)


# ---- 1. declared ranges and cross-field checks, at load time -----------------------------------


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.batch_size=0", ["train.batch_size=0", ">= 1"]),
        ("train.batch_size=-4", ["train.batch_size=-4", ">= 1"]),
        ("train.grad_accum=0", ["train.grad_accum=0", ">= 1"]),
        ("logging.log_every=0", ["logging.log_every=0", ">= 1"]),
        ("optim.lr=-1", ["optim.lr=-1.0", "> 0"]),
        ("optim.lr=.nan", ["optim.lr=nan", "finite"]),
        ("train.max_steps=-1", ["train.max_steps=-1", ">= 1"]),
        ("optim.betas=[0.9,1.5]", ["optim.betas[1]=1.5", "< 1"]),
    ],
)
def test_out_of_range_number_is_one_line(sft, override, fragments):
    check_error(sft(override), "out of range", *fragments)


def test_cross_field_checks(tiny_model_dir, arithmetic_dir, tmp_path):
    kimi = rl_args(tiny_model_dir, arithmetic_dir, tmp_path, "[{name: accuracy}]")
    kimi = [a.replace("grpo.", "kimi.", 1) if a.startswith("grpo.") else a for a in kimi]
    check_error(
        run_inprocess("kimi", REPO / "recipes/kimi_tiny.yaml", *kimi, "train.batch_size=6"),
        "train.batch_size=6",
        "kimi.num_generations=4",
    )
    ppo = [
        f"model.name_or_path={tiny_model_dir}",
        f"train.output_dir={tmp_path}",
        "ppo.prompts_per_rollout=6",
        "train.batch_size=4",
        "train.grad_accum=1",
    ]
    check_error(
        run_inprocess("ppo", REPO / "recipes/ppo_tiny.yaml", *ppo),
        "ppo.prompts_per_rollout × ppo.samples_per_prompt = 6",
        "4 × 1",
    )
    check_error(
        run_inprocess("sft", REPO / "recipes/sft_tiny.yaml", "optim.betas=[0.9]"),
        "optim.betas",
        "exactly two",
    )


def test_every_numeric_recipe_field_declares_its_range():
    """The range checks are only as complete as the declarations: no int/float field without one."""
    import dataclasses
    import typing

    from posttrain.algorithms import ALGORITHMS
    from posttrain.config import Range

    missing = []

    def walk(cls, where):
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            tp, path = hints[f.name], f"{where}{f.name}"
            base = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
            if typing.get_origin(base) is list:
                tp = base = typing.get_args(base)[0]
                base = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
            if dataclasses.is_dataclass(base):
                walk(base, path + ".")
            elif base in (int, float):
                extras = (
                    typing.get_args(tp)[1:] if typing.get_origin(tp) is typing.Annotated else ()
                )
                if not any(isinstance(e, Range) for e in extras):
                    missing.append(path)

    for name, (recipe_cls, _) in ALGORITHMS.items():
        walk(recipe_cls, f"{name}:")
        defaults = recipe_cls()
        from posttrain.config import check_recipe, from_dict, to_dict

        check_recipe(from_dict(recipe_cls, to_dict(defaults)))  # the defaults are in range
    assert not missing, f"numeric fields without a declared Range: {missing}"


# ---- 2. the CLI error boundary -----------------------------------------------------------------


def test_reward_module_or_function_missing(tiny_model_dir, arithmetic_dir, tmp_path):
    args = rl_args(tiny_model_dir, arithmetic_dir, tmp_path / "o", "[{name: 'no_such_mod:f'}]")
    check_error(
        run_inprocess("grpo", REPO / "recipes/grpo_tiny.yaml", *args),
        "'no_such_mod:f'",
        "cannot import module 'no_such_mod'",
    )
    (tmp_path / "r14_rewards_a.py").write_text("def other(p, c, **k):\n    return [0.0] * len(c)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        args = rl_args(
            tiny_model_dir, arithmetic_dir, tmp_path / "o2", "[{name: 'r14_rewards_a:missing'}]"
        )
        check_error(
            run_inprocess("grpo", REPO / "recipes/grpo_tiny.yaml", *args),
            "'r14_rewards_a:missing'",
            "no attribute 'missing'",
        )
    finally:
        sys.path.remove(str(tmp_path))


def test_readme_reward_example_resolves_from_the_working_directory(
    tiny_model_dir, arithmetic_dir, tmp_path
):
    """The README's `my_rewards:brevity`, run by the console script from the folder holding
    my_rewards.py (the script's sys.path does not include the working directory by itself)."""
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, **kw):\n    return [-len(c) / 10 for c in completions]\n"
    )
    out = tmp_path / "out"
    rewards = "[{name: accuracy}, {name: 'my_rewards:brevity', weight: 0.2}]"
    args = rl_args(tiny_model_dir, arithmetic_dir, out, rewards, "train.max_steps=1")
    r = run_script("grpo", REPO / "recipes/grpo_tiny.yaml", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "rewards/my_rewards:brevity/mean" in last


def test_reward_returning_wrong_number_of_scores(tiny_model_dir, arithmetic_dir, tmp_path):
    (tmp_path / "r14_rewards_b.py").write_text("def short(p, c, **k):\n    return [1.0]\n")
    sys.path.insert(0, str(tmp_path))
    try:
        args = rl_args(
            tiny_model_dir, arithmetic_dir, tmp_path / "o", "[{name: 'r14_rewards_b:short'}]"
        )
        check_error(
            run_inprocess("grpo", REPO / "recipes/grpo_tiny.yaml", *args),
            "'r14_rewards_b:short'",
            "returned 1 scores for 8 samples",
        )
    finally:
        sys.path.remove(str(tmp_path))


def test_output_dir_is_a_file(sft, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    check_error(sft(f"train.output_dir={target}"), f"train.output_dir={target}", "is a file")
    check_error(sft(f"train.output_dir={target}/sub"), f"its parent {target}", "is a file")


def test_other_commands_writing_into_a_file(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    check_error(run_inprocess("init-model", target), str(target), "a file of that name")
    check_error(
        run_inprocess("data", "arithmetic", target, "--n", "10", "--n-test", "5"),
        str(target),
        "a file of that name",
    )


def test_output_dir_not_writable(sft, tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses even root
        if not Path("/sys").is_dir():
            pytest.skip("needs /sys (Linux) when running as root")
        target = Path("/sys/posttrain-r14-test-out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out"
    check_error(sft(f"train.output_dir={target}"), f"train.output_dir={target}", "not writable")


def test_save_failure_is_reported_as_what_it_is(tiny_model_dir, arithmetic_dir, tmp_path):
    """A checkpoint write that fails (here: a 1 MiB file-size limit, the weights are 3.6 MB)
    says what failed and where, after training started."""
    out = tmp_path / "out"
    args = sft_overrides(tiny_model_dir, arithmetic_dir, out, **{"train.save_every": 1})

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    r = run_script("sft", REPO / "recipes/sft_tiny.yaml", *args, cwd=REPO, preexec=limit)
    check_error(r, "could not write", str(out), "file too large")


@pytest.fixture()
def small_disk(tmp_path):
    """A tmpfs of a given size (root on Linux only; skipped elsewhere)."""
    mounts = []

    def make(size: str) -> Path:
        mnt = tmp_path / f"disk{len(mounts)}"
        mnt.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True
        )
        if r.returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounts.append(mnt)
        return mnt

    yield make
    for mnt in mounts:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_too_small_is_found_before_training(sft, small_disk):
    disk = small_disk("4m")  # the tiny model's weights alone are 3.6 MB
    check_error(sft(f"train.output_dir={disk}/out"), "MiB free", "checkpoint of this model needs")


@pytest.mark.slow  # ~20 s: a real training run until the disk fills
def test_disk_full_during_save(tiny_model_dir, arithmetic_dir, small_disk):
    disk = small_disk("13m")  # passes the estimate (3 × weights), fills up while saving
    args = sft_overrides(tiny_model_dir, arithmetic_dir, disk / "out", **{"train.save_every": 1})
    r = run_script("sft", REPO / "recipes/sft_tiny.yaml", *args, cwd=REPO)
    check_error(r, "no space left on the device", str(disk / "out"), "--resume")


def test_custom_code_checkpoint_is_refused_in_one_line(
    sft, tiny_model_dir, tmp_path, arithmetic_dir
):
    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "r14_custom"  # only its own code could load it
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomLM",
    }
    (custom / "config.json").write_text(json.dumps(config))
    check_error(sft(f"model.name_or_path={custom}"), "auto_map", "model.trust_remote_code=true")
    # eval has no preflight: transformers' own refusal goes through the boundary
    check_error(
        run_inprocess("eval", custom, arithmetic_dir / "rl_test.jsonl", "--limit", "2"),
        "trust_remote_code",
    )


def test_missing_optional_extra(sft):
    import importlib.util

    if importlib.util.find_spec("tensorboard"):
        pytest.skip("tensorboard is installed")
    check_error(sft("logging.tensorboard=true"), "logging.tensorboard", "pip install")


def test_posttrain_debug_shows_the_traceback(sft, tiny_model_dir, arithmetic_dir, tmp_path):
    args = sft_overrides(tiny_model_dir, arithmetic_dir, tmp_path / "o", **{"train.batch_size": 0})
    r = run_script(
        "sft", REPO / "recipes/sft_tiny.yaml", *args, cwd=REPO, env={"POSTTRAIN_DEBUG": "1"}
    )
    assert r.returncode == 1 and "Traceback" in r.stderr and "ConfigError" in r.stderr, r.stderr


def test_only_foreseeable_errors_are_shortened():
    import errno

    from posttrain.errors import user_message

    assert user_message(KeyError("bug")) is None  # a bug keeps its traceback
    assert user_message(RuntimeError("PytorchStreamWriter failed")) is None
    full = OSError(errno.ENOSPC, "No space left on device", "/x/model.safetensors")
    assert "no space left" in user_message(full, "/x")
    wrapped = RuntimeError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )
    assert "no space left" in user_message(wrapped, "/x")
    missing = ModuleNotFoundError("No module named 'tensorboard'", name="tensorboard")
    assert "pip install" in user_message(missing)
    assert user_message(ModuleNotFoundError("No module named 'numpyy'", name="numpyy")) is None


def test_malformed_json_messages(sft, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "unterminated\n')
    line = check_error(sft(f"data.train_path={bad}"), "bad.jsonl:2", "Unterminated string")
    assert "at at" not in line
    arr = tmp_path / "bad.json"
    arr.write_text('[{"text": "a"},\n {"text": }]')
    check_error(sft(f"data.train_path={arr}"), "bad.json:2", "malformed JSON", "column 11")


def test_yaml_syntax_error_names_line_on_the_same_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: x\ntrain:\n  max_steps: [1\n  batch_size: 2\n")
    check_error(run_inprocess("sft", bad), "bad.yaml:5:13", "not valid YAML")


def test_completion_of_the_wrong_type_names_the_row(sft, tmp_path):
    bad = tmp_path / "pc.jsonl"
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": 4}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check_error(sft(f"data.train_path={bad}"), "pc.jsonl", "row 2", "'completion'", "int")


# ---- 4. reward timeouts --------------------------------------------------------------------------


def test_reward_timeout_default_is_finite():
    from posttrain.algorithms.grpo import GRPOConfig
    from posttrain.algorithms.ppo import PPOConfig

    assert 0 < GRPOConfig().reward_timeout_s <= 60
    assert 0 < PPOConfig().reward_timeout_s <= 60


def test_grpo_finishes_when_a_reward_never_returns(tiny_model_dir, arithmetic_dir, tmp_path):
    (tmp_path / "r14_rewards_c.py").write_text(
        "import threading\ndef forever(p, c, **k):\n    threading.Event().wait()  # never returns\n"
    )
    out = tmp_path / "out"
    rewards = "[{name: accuracy}, {name: 'r14_rewards_c:forever'}]"
    args = rl_args(tiny_model_dir, arithmetic_dir, out, rewards, "grpo.reward_timeout_s=0.5")
    sys.path.insert(0, str(tmp_path))
    try:
        r = run_inprocess("grpo", REPO / "recipes/grpo_tiny.yaml", *args)
    finally:
        sys.path.remove(str(tmp_path))
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records if "scoring/timeouts" in rec] == [1, 2]
    assert all(
        rec["rewards/r14_rewards_c:forever/timeouts"] == 8 for rec in records if "step" in rec
    )
    assert (out / "final" / "model.safetensors").is_file()


# ---- 5. text columns of CSV / Parquet stay text ------------------------------------------------------


def test_csv_and_parquet_digit_columns_are_text(sft, tmp_path):
    import pandas as pd

    from posttrain.data.loading import load_rows

    frame = pd.DataFrame({"prompt": ["1+1=", "40+2=", "3+4="], "completion": ["2", "042", "7"]})
    frame.to_csv(tmp_path / "pc.csv", index=False)
    pd.DataFrame({"prompt": ["a"], "answer": [42], "margin": [1.5]}).to_parquet(
        tmp_path / "p.parquet"
    )
    assert load_rows(tmp_path / "pc.csv")["completion"] == ["2", "042", "7"]
    parquet = load_rows(tmp_path / "p.parquet")
    assert parquet["answer"] == ["42"] and parquet["margin"] == [1.5]
    r = sft(f"data.train_path={tmp_path / 'pc.csv'}", "train.max_steps=1")
    assert r.returncode == 0, r.stderr


# ---- 3. trainer commands come from the registry ----------------------------------------------------


def test_trainer_commands_are_generated_from_the_registry(monkeypatch):
    from typer.testing import CliRunner

    from posttrain import algorithms
    from posttrain.cli import app

    listing = CliRunner().invoke(app, ["--help"]).stdout
    for name in algorithms.ALGORITHMS:
        assert f" {name} " in listing, name
    monkeypatch.setitem(algorithms.ALGORITHMS, "sft_copy", algorithms.ALGORITHMS["sft"])
    r = CliRunner().invoke(app, ["sft_copy", "--help"])
    assert r.exit_code == 0 and "--resume" in r.stdout, r.stdout
