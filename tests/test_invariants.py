"""The update must not depend on how a global batch is split: batch 8 x accumulation 1 and
batch 1 x accumulation 8 give the same loss and gradients; packed rows give the same loss as
padded rows."""

import torch
from accelerate import Accelerator
from cli_helpers import REPO, sft_overrides

from posttrain.algorithms.sft import SFT, SFTRecipe, forward_logits
from posttrain.config import load_recipe
from posttrain.losses.sft import cross_entropy_loss
from posttrain.train.loop import accumulate_gradients


def build(tiny_model_dir, arithmetic_dir, tmp_path, **extra):
    cfg = load_recipe(
        SFTRecipe,
        REPO / "recipes/sft_tiny.yaml",
        sft_overrides(tiny_model_dir, arithmetic_dir, tmp_path, **extra),
    )
    algo = SFT(cfg)
    accelerator = Accelerator(cpu=True)
    model = algo.setup(accelerator)
    return cfg, algo, accelerator, model


def grads_and_loss(algo, accelerator, model, step=0):
    model.zero_grad(set_to_none=True)
    model.train()
    batches = algo.micro_batches(step, accelerator, model)
    units = accumulate_gradients(accelerator, model, algo, batches)
    with torch.no_grad():
        loss = sum(algo.compute_loss(model, b).total for b in batches) / units
    return {n: p.grad.clone() for n, p in model.named_parameters()}, float(loss), len(batches)


def test_batch8_accum1_equals_batch1_accum8(tiny_model_dir, arithmetic_dir, tmp_path):
    _, algo_a, acc_a, model_a = build(
        tiny_model_dir,
        arithmetic_dir,
        tmp_path / "a",
        **{"train.batch_size": 8, "train.grad_accum": 1},
    )
    _, algo_b, acc_b, model_b = build(
        tiny_model_dir,
        arithmetic_dir,
        tmp_path / "b",
        **{"train.batch_size": 1, "train.grad_accum": 8},
    )
    grads_a, loss_a, n_a = grads_and_loss(algo_a, acc_a, model_a)
    grads_b, loss_b, n_b = grads_and_loss(algo_b, acc_b, model_b)
    assert (n_a, n_b) == (1, 8)
    assert abs(loss_a - loss_b) < 1e-5
    for name, g in grads_a.items():
        torch.testing.assert_close(g, grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
    # And the rows really differ in length, so a per-row mean would not have matched.
    lengths = {int(b.attention_mask.sum()) for b in algo_b.micro_batches(0, acc_b, model_b)}
    assert len(lengths) > 1


def test_packed_loss_equals_unpacked(tiny_model_dir, arithmetic_dir, tmp_path):
    _, algo, accelerator, model = build(
        tiny_model_dir, arithmetic_dir, tmp_path, **{"train.batch_size": 16, "data.max_length": 256}
    )
    examples = algo.train_data.examples[:16]
    model.eval()
    with torch.no_grad():
        padded = algo.collate(examples)
        algo.cfg.data.packing = True
        packed = algo.collate(examples)
        assert packed.input_ids.shape[0] < padded.input_ids.shape[0]  # really packed
        lp = cross_entropy_loss(forward_logits(model, padded), padded.labels)
        lk = cross_entropy_loss(forward_logits(model, packed), packed.labels)
    assert int(lp.units) == int(lk.units)
    assert abs(float(lp.total / lp.units) - float(lk.total / lk.units)) < 1e-5


def test_packing_isolates_examples(tiny_model_dir, arithmetic_dir, tmp_path):
    """The LATER example of a packed row gets the logits it gets alone: neither its attention
    nor its positions may see the example packed before it. (The earlier example is unchanged
    by causal masking alone, so checking it would prove nothing.)"""
    _, algo, _, model = build(
        tiny_model_dir, arithmetic_dir, tmp_path, **{"data.packing": True, "data.max_length": 256}
    )
    pool = sorted(algo.train_data.examples[:20], key=lambda e: len(e.input_ids))
    short, long = pool[0], pool[-1]
    assert len(long.input_ids) > len(short.input_ids)
    n, m = len(long.input_ids), len(short.input_ids)
    model.eval()
    with torch.no_grad():
        packed = algo.collate([long, short])
        assert packed.input_ids.shape[0] == 1  # both in one row, longer first (first-fit decr.)
        assert packed.input_ids[0, n : n + m].tolist() == list(short.input_ids)
        together = forward_logits(model, packed)[0, n : n + m]
        alone = forward_logits(model, algo.collate([short]))[0, :m]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
