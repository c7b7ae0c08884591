import json

import pytest

from posttrain.data.arithmetic import make_arithmetic
from posttrain.data.collate import pack_collate, pack_rows, pad_collate
from posttrain.data.encoding import EncodedExample, detect_format, encode_sft_row
from posttrain.data.loading import DataError, load_rows
from posttrain.models.loading import load_tokenizer


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_arithmetic_is_deterministic_and_held_out(tmp_path):
    a = make_arithmetic(tmp_path / "a", n=500, n_test=100, seed=3)
    make_arithmetic(tmp_path / "b", n=500, n_test=100, seed=3)
    assert a["sft_train.jsonl"] == 500 and a["rl_test.jsonl"] == 100
    for name in a:
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    make_arithmetic(tmp_path / "c", n=500, n_test=100, seed=4)
    assert (tmp_path / "a" / "rl_test.jsonl").read_text() != (
        tmp_path / "c" / "rl_test.jsonl"
    ).read_text()

    def problems(kind, split):
        rows = read_jsonl(tmp_path / "a" / f"{kind}_{split}.jsonl")
        texts = [
            r["messages"][0]["content"] if "messages" in r else r["prompt"][0]["content"]
            for r in rows
        ]
        return {
            tuple(int(x) for x in t.replace("?", " ").replace(".", " ").split() if x.isdigit())
            for t in texts
        }

    test_problems = problems("rl", "test")
    assert len(test_problems) == 100
    for kind in ("sft", "rl", "preference", "prompt_completion", "preference_all"):
        assert not (problems(kind, "train") & test_problems), kind
    # every training problem, each with every near miss (at least 4 per problem)
    assert len(problems("preference_all", "train")) == 90 * 90 - 100
    assert a["preference_all_train.jsonl"] >= 4 * (90 * 90 - 100)


def test_arithmetic_rows_are_consistent(tmp_path):
    make_arithmetic(tmp_path, n=200, n_test=50)
    all_rows = read_jsonl(tmp_path / "preference_all_train.jsonl")
    for row in read_jsonl(tmp_path / "preference_train.jsonl") + all_rows[:500]:
        a, b = [
            int(x)
            for x in row["prompt"][0]["content"].replace("?", " ").replace(".", " ").split()
            if x.isdigit()
        ]
        assert row["chosen"][0]["content"] == str(a + b)
        assert row["rejected"][0]["content"] != str(a + b)
    for row in read_jsonl(tmp_path / "rl_test.jsonl"):
        assert row["answer"].isdigit()


def test_chat_loss_mask_covers_only_assistant_tokens(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "42"},
            {"role": "user", "content": "And 1 + 1?"},
            {"role": "assistant", "content": "2"},
        ]
    }
    ex = encode_sft_row(tok, row, "messages", 512, "row")
    targets = tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if m])
    # Both assistant turns and their end-of-turn tokens, nothing else.
    assert targets == "42<|end|>2<|end|>"
    assert not ex.truncated


def test_prompt_completion_formats(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    conv = encode_sft_row(
        tok,
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello"}],
        },
        "prompt_completion",
        512,
        "row",
    )
    assert tok.decode([i for i, m in zip(conv.input_ids, conv.loss_mask) if m]) == "Hello<|end|>"
    plain = encode_sft_row(
        tok, {"prompt": "2 + 2 =", "completion": " 4"}, "prompt_completion", 512, "row"
    )
    assert tok.decode([i for i, m in zip(plain.input_ids, plain.loss_mask) if m]) == " 4<|end|>"
    text = encode_sft_row(tok, {"text": "abc"}, "text", 512, "row")
    assert all(text.loss_mask)
    cut = encode_sft_row(tok, {"text": "a long line of text " * 10}, "text", 8, "row")
    assert cut.truncated and len(cut.input_ids) == 8


def test_detect_format_errors():
    assert detect_format(["messages", "id"], "f.jsonl") == "messages"
    assert detect_format(["prompt", "completion"], "f.jsonl") == "prompt_completion"
    with pytest.raises(
        DataError,
        match=r"f.jsonl: missing column; expected 'messages', or 'prompt' and 'completion', or 'text' \(found: question\)",
    ):
        detect_format(["question"], "f.jsonl")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON line"):
        load_rows(path)
    with pytest.raises(DataError, match="data file not found"):
        load_rows(tmp_path / "nope.jsonl")


def test_other_file_types_load(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in ("d.parquet", "d.csv", "saved"):
        assert load_rows(tmp_path / path)["text"] == ["a", "b"]


def test_pack_rows_first_fit():
    rows = pack_rows([5, 3, 4, 2], 8)
    assert sorted(sum([5, 3, 4, 2][i] for i in r) for r in rows) == [6, 8]


def test_packed_batch_positions_and_labels():
    examples = [EncodedExample([1, 2, 3], [0, 1, 1]), EncodedExample([4, 5], [0, 1])]
    packed = pack_collate(examples, pad_id=0, row_length=8)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # Each example predicts only its own tokens: no label crosses the boundary at index 2.
    assert packed.labels.tolist() == [[2, 3, -100, 5, -100]]
    assert packed.attention_mask is None
    padded = pad_collate(examples, pad_id=0)
    assert padded.labels.tolist() == [[2, 3, -100], [5, -100, -100]]
    assert padded.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert packed.num_loss_tokens == padded.num_loss_tokens == 3
