"""Data as `datasets` users know it (issue 17 items 5-6): sources, splits, subsets, mixtures,
tokenisation through datasets.map (same rows and masks as the per-row encoder, cached), and the
one-line errors for an empty path, an unreachable hub and a missing flash-attn."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys

import datasets
import pytest
from cli_helpers import REPO, run_cli, sft_overrides

from posttrain import hub
from posttrain.config import ModelConfig
from posttrain.data import tokenized
from posttrain.data.encoding import encode_prompt_completion, encode_sft_examples, encode_sft_file
from posttrain.data.kto import encode_kto_file
from posttrain.data.loading import DataError, Source, load_rows
from posttrain.data.preference import encode_preference_file
from posttrain.data.tokenized import MapOptions
from posttrain.models.loading import ModelError, load_causal_lm, load_tokenizer


def write_jsonl(path, rows, opener=open):
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def chat(i: int, turns: int = 2) -> dict:
    messages = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"question {i}.{t}: what is {i} + {t}?"})
        messages.append({"role": "assistant", "content": f"{i + t} " + "ok " * (i % 7)})
    return {"messages": messages}


@pytest.fixture()
def hub_dir(tmp_path):
    """A hub-style directory: sharded train files (one gzipped), a parquet test split."""
    root = tmp_path / "hubstyle"
    write_jsonl(root / "data" / "train-00000-of-00002.jsonl", [chat(i) for i in range(6)])
    write_jsonl(
        root / "data" / "train-00001-of-00002.jsonl.gz", [chat(i) for i in range(6, 10)], gzip.open
    )
    datasets.Dataset.from_list([chat(i) for i in range(100, 103)]).to_parquet(
        str(root / "data" / "test-00000-of-00001.parquet")
    )
    return root


def contents(ds) -> list[str]:
    return [row["messages"][0]["content"] for row in ds]


def test_sources_splits_and_globs(hub_dir, tmp_path):
    train = load_rows(str(hub_dir))
    assert contents(train) == [f"question {i}.0: what is {i} + 0?" for i in range(10)]
    # eval reads the test split by default (it used to read "train")
    held_out = load_rows(Source(str(hub_dir), role="eval", key="data.eval_path"))
    assert len(held_out) == 3 and contents(held_out)[0].startswith("question 100.")
    assert len(load_rows(str(hub_dir), split="test")) == 3
    with pytest.raises(DataError, match=r"no split 'validation' \(has train, test\)"):
        load_rows(str(hub_dir), split="validation")
    # a glob and a compressed file read like any file
    assert contents(load_rows(str(hub_dir / "data" / "train-*.jsonl*"))) == contents(train)
    assert len(load_rows(str(hub_dir / "data" / "train-00001-of-00002.jsonl.gz"))) == 4
    with pytest.raises(DataError, match="no files match"):
        load_rows(str(tmp_path / "nothing-*.jsonl"))
    # a single file has one split, "train"; a single-file eval set is that split
    one = hub_dir / "data" / "train-00000-of-00002.jsonl"
    assert len(load_rows(Source(str(one), role="eval"))) == 6
    with pytest.raises(DataError, match="no split 'test'.*data.train_split"):
        load_rows(str(one), split="test")
    # save_to_disk keeps working, and its test split is the eval default
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": train, "test": held_out}).save_to_disk(str(saved))
    assert len(load_rows(Source(str(saved), role="eval"))) == 3
    assert len(load_rows(str(saved))) == 10


def test_compressed_jsonl_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write(json.dumps(chat(0)) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl.gz:2: malformed JSON line"):
        load_rows(str(bad))


def test_subsets_from_readme_configs(tmp_path):
    root = tmp_path / "configured"
    write_jsonl(root / "easy.jsonl", [chat(i) for i in range(3)])
    write_jsonl(root / "hard" / "train.jsonl", [chat(i, turns=3) for i in range(5)])
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: easy\n  data_files: easy.jsonl\n"
        "- config_name: hard\n  data_files:\n  - split: train\n    path: hard/*.jsonl\n---\n# d\n"
    )
    assert len(load_rows(str(root), subset="hard")) == 5
    assert len(load_rows(str(root), subset="easy")) == 3
    with pytest.raises(DataError, match=r"no subset 'medium' \(README.md lists easy, hard\)"):
        load_rows(str(root), subset="medium")
    with pytest.raises(DataError, match="data.subset='hard' names a dataset config"):
        load_rows(str(root / "easy.jsonl"), subset="hard")


def test_empty_path_and_offline_hub_are_one_line_errors(monkeypatch):
    with pytest.raises(DataError, match=r"^data.train_path is empty: set it to a data file"):
        load_rows("")
    # offline mode (set before the libraries are imported, as a user sets it): they search only
    # the local cache, quickly; the error is one line
    script = (
        "import time; from posttrain.data.loading import load_rows, DataError\n"
        "start = time.perf_counter()\n"
        "try: load_rows('no-such-org/no-such-dataset')\n"
        "except DataError as e: print(f'{time.perf_counter() - start:.2f} s|{e}')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    seconds, message = done.stdout.strip().split("|")
    assert "\n" not in message and "HF_HUB_OFFLINE is set" in message, done.stderr[-2000:]
    print(f"offline hub id failed in {seconds}: {message}")
    # no network (an endpoint nothing listens on): refused before any retry loop
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub.unreachable_reason.cache_clear()
    try:
        with pytest.raises(DataError, match=r"the hub is unreachable: cannot reach http"):
            load_rows("no-such-org/no-such-dataset")
        with pytest.raises(ModelError, match=r"no-such-org/model: not a local model directory"):
            load_tokenizer("no-such-org/model")
    finally:
        hub.unreachable_reason.cache_clear()


def test_missing_flash_attn_names_the_package(tiny_model_dir):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), attn_implementation="flash_attention_2")
    with pytest.raises(
        ModelError,
        match=r"needs the flash-attn package.*pip install flash-attn; values that work: sdpa, eager$",
    ):
        load_causal_lm(cfg)


def per_row_sft(tok, rows, fmt, max_length, side, where, limit=None):
    """The per-row loop tokenisation ran before datasets.map (reference for equality)."""
    examples, truncated, skipped = [], 0, 0
    for i, row in enumerate(rows):
        if limit is not None and len(examples) >= limit:
            break
        for ex in encode_sft_examples(tok, row, fmt, max_length, f"{where}: row {i + 1}", side):
            truncated += ex.truncated
            if sum(ex.loss_mask[1:]) == 0:
                skipped += 1
                continue
            examples.append((ex.input_ids, ex.loss_mask, ex.truncated))
    return examples, truncated, skipped


@pytest.fixture()
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache" / "posttrain-tokenized"


def test_map_tokenisation_equals_the_per_row_loop(tiny_model_dir, tmp_path, cache_home):
    tok = load_tokenizer(str(tiny_model_dir))
    rows = [chat(i, turns=1 + i % 3) for i in range(40)]
    path = tmp_path / "chats.jsonl"
    write_jsonl(path, rows)
    loaded = load_rows(str(path))
    for max_length, side, limit in ((512, "right", None), (24, "left", None), (20, "right", 7)):
        want = per_row_sft(tok, loaded, "messages", max_length, side, str(path), limit)
        for options in (MapOptions(num_proc=2), MapOptions(cache=False), MapOptions(num_proc=2)):
            got = encode_sft_file(tok, str(path), "auto", max_length, limit, side, options)
            assert [(e.input_ids, e.loss_mask, e.truncated) for e in got.examples] == want[0]
            assert (got.truncated, got.skipped) == want[1:]
    assert want[1] > 0 and len(want[0]) == 7  # truncation and the limit were exercised
    # one cache entry per distinct (rows, tokenizer, settings); a rerun reads it, writes nothing
    entries = sorted(cache_home.glob("*.arrow"))
    assert len({p.name.split("_")[0] for p in entries}) >= 3
    encode_sft_file(tok, str(path), "auto", 512, options=MapOptions(num_proc=2))
    assert sorted(cache_home.glob("*.arrow")) == entries
    before = tokenized.tokenizer_fingerprint(tok)
    tok.chat_template = tok.chat_template.replace("<|end|>", "<|end|>\n")
    assert tokenized.tokenizer_fingerprint(tok) != before


def test_preference_and_kto_map_equal_the_per_row_loop(tiny_model_dir, tmp_path, cache_home):
    tok = load_tokenizer(str(tiny_model_dir))
    pairs = [
        {"prompt": f"{i} + 1 =", "chosen": f" {i + 1}" * (1 + i % 9), "rejected": f" {i + 2}"}
        for i in range(30)
    ]
    pairs[3]["rejected"] = pairs[3]["chosen"]  # identical: skipped
    pairs[4]["chosen"] = " "  # empty: skipped
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, pairs)
    got = encode_preference_file(tok, str(path), 12, options=MapOptions(num_proc=2))
    want = []
    for i, row in enumerate(pairs):
        if i in (3, 4):
            continue
        c = encode_prompt_completion(tok, row["prompt"], row["chosen"], "")
        r = encode_prompt_completion(tok, row["prompt"], row["rejected"], "")
        want.append((c[0][:12], c[1][:12], r[0][:12], r[1][:12]))
    kept = [(e.chosen_ids, e.chosen_mask, e.rejected_ids, e.rejected_mask) for e in got.examples]
    assert kept == want and got.skipped["identical"] == 1 and got.skipped["empty"] == 1
    assert got.truncated > 0
    rows = [
        {"prompt": f"{i} * 2 =", "completion": f" {2 * i}", "label": i % 3 != 0} for i in range(20)
    ]
    write_jsonl(tmp_path / "kto.jsonl", rows)
    data = encode_kto_file(tok, str(tmp_path / "kto.jsonl"), 64, options=MapOptions(num_proc=2))
    for e, row in zip(data.examples, rows, strict=True):
        ids, mask = encode_prompt_completion(tok, row["prompt"], row["completion"], "")
        start = mask.index(1)
        assert (e.prompt_ids, e.completion_ids, e.completion_mask, e.desirable) == (
            ids[:start],
            ids[start:],
            mask[start:],
            row["label"],
        )
    # a bad row's error still names the file and row, also from a worker process
    bad = [chat(i) for i in range(8)]
    bad[5]["messages"][0]["role"] = "robot"
    write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError, match=r"bad.jsonl: row 6: .*robot"):
        encode_sft_file(
            tok, str(tmp_path / "bad.jsonl"), "auto", 64, options=MapOptions(num_proc=2)
        )


def test_mixture_is_weighted_seeded_and_mixes_formats(tiny_model_dir, tmp_path, cache_home):
    tok = load_tokenizer(str(tiny_model_dir))
    write_jsonl(tmp_path / "a.jsonl", [chat(i, turns=1) for i in range(200)])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"p{i}", "completion": " c"} for i in range(200)])
    sources = [Source(str(tmp_path / "a.jsonl"), weight=3), Source(str(tmp_path / "b.jsonl"))]

    def encode(seed):
        return encode_sft_file(tok, sources, "auto", 64, options=MapOptions(seed=seed)).examples

    first, again, other = encode(0), encode(0), encode(1)
    assert [e.input_ids for e in first] == [e.input_ids for e in again]
    assert [e.input_ids for e in first] != [e.input_ids for e in other]
    from_a = sum(len(e.input_ids) > 12 for e in first)  # chat rows are the longer ones
    # stops when a runs out (first_exhausted): all 200 of a, about 200/3 of b
    assert from_a == 200 and 40 < len(first) - from_a < 100, (from_a, len(first))


@pytest.mark.slow
def test_sft_trains_on_a_glob_split_mixture(tiny_model_dir, arithmetic_dir, hub_dir, tmp_path):
    """A recipe's data section with a glob, a named split and a weighted mixture trains."""
    out = tmp_path / "run"
    mixture = [
        {"path": str(hub_dir / "data" / "train-*.jsonl*"), "weight": 0.5},
        {"path": str(arithmetic_dir / "sft_train.jsonl"), "weight": 0.5},
    ]
    overrides = {
        "data.train_path": json.dumps(mixture),
        "data.eval_path": str(hub_dir),
        "data.num_proc": 2,
        "train.max_steps": 2,
        "train.eval_every": 2,
    }
    result = run_cli(
        "sft",
        "recipes/sft_tiny.yaml",
        *sft_overrides(tiny_model_dir, arithmetic_dir, out, **overrides),
        env={"HF_DATASETS_CACHE": str(tmp_path / "hf-cache")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(0.5) + " in result.stdout  # the log line names both sources and their shares
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and "eval/loss" in records[-1]
    assert (out / "final" / "config.json").is_file()
    card = (out / "final" / "README.md").read_text()  # the model card lists both sources
    assert card.count("- **train data**") == 2 and "weight 0.5" in card
