"""The chunked LM head (models/lm_head.py, losses/chunked_ce.py) equals the plain full-logits
computation, in values and gradients, and never creates the (B, T, V) logits.

Equalities: pure torch on a random head (soft-capped and not), then through tiny real models of
the architecture matrix (Gemma 2 with final-logit soft-capping, Llama with tied embeddings,
Llama untied with LoRA on lm_head) for the SFT loss, completion log-probs at a temperature
(with entropy, one row per sample and the shared-prompt forward) and DPO sequence log-probs,
comparing the gradient of every parameter. Then the start-up gate (auto, off, a model whose
logits it cannot reproduce), the memory claim (no op output of shape (>= B*T/2, V) in forward
or backward, watched at the dispatcher) and SFT / GRPO runs through the CLI with chunking on
and off giving the same losses.
"""

from __future__ import annotations

import json
import types
import weakref

import pytest
import torch
from arch_models import attn_of, build_family
from cli_helpers import run_cli, sft_overrides
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from posttrain.algorithms.dpo import completion_logps
from posttrain.algorithms.sft import chunked_loss, forward_logits
from posttrain.losses.chunked_ce import chunked_cross_entropy, chunked_token_logprobs
from posttrain.losses.sft import cross_entropy_loss
from posttrain.models import lm_head
from posttrain.rollout import sequence_logprobs

TOL = 1e-5


# ---- pure torch ------------------------------------------------------------------------------


@pytest.mark.parametrize("eager", [False, True], ids=["recompute", "grads-in-forward"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_pure_chunked_equals_plain(softcap, chunk, eager):
    torch.manual_seed(0)
    n, hidden_size, vocab = 13, 8, 11
    head = torch.nn.Linear(hidden_size, vocab, bias=True)

    def logits_of(h):
        logits = head(h).float()
        return logits if softcap is None else torch.tanh(logits / softcap) * softcap

    h0 = torch.randn(n, hidden_size) * 3
    targets = torch.randint(0, vocab, (n,))
    labels = targets.clone()
    labels[[1, 5]] = -100
    weights = torch.randn(n)

    def run(chunked: bool):
        head.zero_grad()
        h = h0.clone().requires_grad_(True)
        if chunked:
            lp, ent = chunked_token_logprobs(h, logits_of, targets, chunk, 0.7, True)
            params = list(head.parameters()) if eager else ()
            ce, units, hits = chunked_cross_entropy(h, logits_of, labels, chunk, params=params)
        else:
            logp = (logits_of(h) / 0.7).log_softmax(-1)
            lp = logp.gather(-1, targets[:, None]).squeeze(-1)
            ent = -(logp.exp() * logp).sum(-1)
            full = logits_of(h)
            ce = torch.nn.functional.cross_entropy(full, labels, reduction="sum")
            units = (labels != -100).sum().float()
            hits = ((full.argmax(-1) == labels) & (labels != -100)).sum()
        ((lp * weights).sum() + (ent * weights).sum() + ce).backward()
        grads = [h.grad, head.weight.grad.clone(), head.bias.grad.clone()]
        return [lp, ent, ce, units, hits.float()], grads

    values, grads = run(False)
    chunk_values, chunk_grads = run(True)
    for a, b in zip(values + grads, chunk_values + chunk_grads, strict=True):
        torch.testing.assert_close(b.detach(), a.detach(), atol=TOL, rtol=TOL)


# ---- tiny real models ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    from posttrain.models.tokenizer import build_tokenizer

    tokenizer, root, cache = build_tokenizer(vocab_size=512), tmp_path_factory.mktemp("fam"), {}

    def load(family: str):
        if family not in cache:
            cache[family] = build_family(family, root / family, tokenizer)
        path = cache[family]
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_of(path))

    return load


def lora_on_head(model):
    """LoRA on q_proj and lm_head with a non-zero B, so the adapter changes the logits."""
    from posttrain.config import LoraConfig
    from posttrain.models.loading import apply_lora

    model = apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


FAMILIES = {
    "gemma2-softcap": lambda m: m,  # final_logit_softcapping = 10
    "llama-tied": lambda m: m,  # lm_head.weight is the embedding
    "llama": lora_on_head,
}


def grads_of(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, compute, chunk: int = 5):
    """compute(model) -> (tensors to compare, scalar loss), plain then chunked."""
    assert lm_head.configure(model, 0) == 0
    plain, loss = compute(model)
    plain_grads = grads_of(model, loss)
    assert lm_head.configure(model, chunk) == chunk
    try:
        chunked, loss = compute(model)
        chunked_grads = grads_of(model, loss)
    finally:
        lm_head.configure(model, 0)
    for a, b in zip(plain, chunked, strict=True):
        torch.testing.assert_close(b.detach(), a.detach(), atol=TOL, rtol=TOL)
    assert plain_grads.keys() == chunked_grads.keys() and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=TOL, rtol=TOL, msg=name)


def rollout_rows(vocab: int, groups: int = 2, group: int = 3):
    """(N, P) left-padded prompts shared by runs of `group` rows, (N, C) right-padded answers."""
    g = torch.Generator().manual_seed(1)
    n, P, C = groups * group, 6, 7
    prompts = torch.randint(3, vocab, (groups, P), generator=g).repeat_interleave(group, 0)
    prompt_mask = torch.ones(n, P, dtype=torch.long)
    prompt_mask[:group, :2] = 0  # the first prompt is shorter (left padding)
    completions = torch.randint(3, vocab, (n, C), generator=g)
    completion_mask = torch.ones(n, C, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[4, 2:] = 0
    return prompts, prompt_mask, completions, completion_mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_completion_logprobs_equal(family_model, family):
    model = FAMILIES[family](family_model(family))
    rows = rollout_rows(model.config.vocab_size)
    weights = torch.randn(rows[2].shape, generator=torch.Generator().manual_seed(2))

    def compute(m, group_size):
        logp, entropy = sequence_logprobs(m, *rows, 0.7, return_entropy=True, group_size=group_size)
        return [logp, entropy], (logp * weights).sum() + 0.1 * (entropy * weights).sum()

    compare(model, lambda m: compute(m, 1))
    # the shared-prompt forward where the attention takes a 4-D mask (all three do)
    compare(model, lambda m: compute(m, 3))


def sft_batch(vocab: int, B: int = 3, T: int = 12):
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, vocab, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[2, 9:] = 0
    labels = input_ids.roll(-1, 1)
    labels[:, :4] = -100  # the prompt
    labels[:, -1] = -100
    labels[attention_mask == 0] = -100
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return types.SimpleNamespace(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sft_loss_equal(family_model, family):
    model = FAMILIES[family](family_model(family))
    batch = sft_batch(model.config.vocab_size)

    def compute(m):
        plan = lm_head.plan_of(m)
        if plan is None:
            out = cross_entropy_loss(forward_logits(m, batch), batch.labels)
        else:
            out = chunked_loss(m, batch, plan)
        return [out.total, out.units, out.metrics["token_accuracy"]], out.total / out.units

    compare(model, compute, chunk=4)


@pytest.mark.parametrize("family", ["gemma2-softcap", "llama-tied"])
def test_dpo_sequence_logprobs_equal(family_model, family):
    model = family_model(family)
    batch = sft_batch(model.config.vocab_size)  # rows with labels: a padded preference batch

    def compute(m):
        sums, counts = completion_logps(m, batch)
        return [sums, counts], (sums * torch.tensor([1.0, -2.0, 0.5])).sum()

    compare(model, compute, chunk=3)


def test_packed_dpo_logprobs_equal(family_model, tmp_path):
    """The prefix-shared packed preference batch (dpo/kto data.packing) through the head."""
    from posttrain.data.preference import encode_preference_file
    from posttrain.data.preference_packing import packed_preference_collate
    from posttrain.models.tokenizer import build_tokenizer

    rows = [
        {"prompt": "What is 41 + 44?", "chosen": "85", "rejected": "86 or so"},
        {"prompt": "a long preamble, then 12 + 30", "chosen": "42", "rejected": "a long answer"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tok = build_tokenizer(vocab_size=512)
    examples = encode_preference_file(tok, str(path), max_length=64).examples
    batch = packed_preference_collate(examples, tok.pad_token_id, 64)
    model = family_model("gemma2-softcap")

    def compute(m):
        sums, counts = completion_logps(m, batch)
        return [sums, counts], (sums * torch.tensor([1.0, -2.0, 0.5, 0.3])).sum()

    compare(model, compute, chunk=3)


# ---- the start-up gate -----------------------------------------------------------------------


class DoubledLogits(LlamaForCausalLM):
    """Post-processes its logits in a way the chunked head does not know about."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids, attention_mask, logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits * 2
        return out


class NoLogitsToKeep(LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_gate_auto_off_and_step_aside(family_model, capfd):
    model = family_model("llama")
    assert lm_head.effective_chunk(-1, 151_936) == lm_head.AUTO_CHUNK
    assert lm_head.configure(model, -1) == 0  # auto: vocab 512 is small
    assert lm_head.configure(model, 0) == 0 and lm_head.plan_of(model) is None
    assert lm_head.configure(model, 8) == 8 and lm_head.plan_of(model).chunk == 8
    lm_head.configure(model, 0)
    assert "chunked lm_head" not in capfd.readouterr().out

    for cls, why in ((DoubledLogits, "differ"), (NoLogitsToKeep, "no logits_to_keep")):
        other = cls(model.config)
        assert lm_head.configure(other, 8) == 0 and lm_head.plan_of(other) is None
        line = capfd.readouterr().out.strip()
        assert line.startswith("note: chunked lm_head (model.logit_chunk_tokens) is off for llama")
        assert why in line and "\n" not in line


# ---- memory: no (B, T, V) float32 logits alive, forward or backward --------------------------------


class LiveLogits(TorchDispatchMode):
    """Watches every op output that is float32 with the vocabulary as last dimension (logits,
    log-probs, their gradients; the head's (H, V) weight transpose is not one) and records the
    most rows of such tensors alive at once: a single (B*T, V) tensor, or B*T rows of saved
    chunks kept for backward, both show up."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.live, self.peak = vocab, hidden, [], 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(t, torch.Tensor)
                and t.dtype == torch.float32
                and t.dim() >= 2
                and t.shape[-1] == self.vocab
                and tuple(t.shape) != (self.hidden, self.vocab)
            ):
                self.live.append(weakref.ref(t))
        alive = [r() for r in self.live]
        self.live = [r for r, t in zip(self.live, alive, strict=True) if t is not None]
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in alive
            if t is not None
        }
        self.peak = max(self.peak, sum(storages.values()) // (4 * self.vocab))
        return out


def test_no_full_logits_tensor(family_model):
    model = family_model("llama-tied")
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    batch = sft_batch(vocab, B=4, T=24)
    rows = rollout_rows(vocab, groups=3, group=4)
    sft_rows, rollout_positions = int((batch.labels != -100).sum()), int(rows[3].sum())

    def peak(chunk: int, compute) -> int:
        lm_head.configure(model, chunk)
        watcher = LiveLogits(vocab, hidden)
        with watcher:
            compute().backward()
        lm_head.configure(model, 0)
        return watcher.peak

    def sft():
        plan = lm_head.plan_of(model)
        if plan is None:
            return cross_entropy_loss(forward_logits(model, batch), batch.labels).total
        return chunked_loss(model, batch, plan).total

    def rollout():
        logp, entropy = sequence_logprobs(model, *rows, 0.7, return_entropy=True)
        return logp.sum() + entropy.sum()

    assert peak(0, sft) >= sft_rows  # the watcher sees the plain path's logits
    for compute, positions in ((sft, sft_rows), (rollout, rollout_positions)):
        # chunked: a few (chunk, V) tensors at a time (logits, tempered, log-softmax, exp,
        # gradients), not one per position
        assert peak(2, compute) <= 6 * 2 < positions / 2


# ---- end to end through the CLI --------------------------------------------------------------


def losses(out) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.slow
def test_sft_run_chunked_equals_plain(tiny_model_dir, arithmetic_dir, tmp_path):
    runs = {}
    for chunk in (0, 16):
        out = tmp_path / f"chunk{chunk}"
        result = run_cli(
            "sft",
            "recipes/sft_tiny.yaml",
            *sft_overrides(
                tiny_model_dir,
                arithmetic_dir,
                out,
                **{"train.max_steps": 3, "model.logit_chunk_tokens": chunk, "optim.lr": 3e-3},
            ),
        )
        assert result.returncode == 0, result.stderr
        runs[chunk] = losses(out)
    assert len(runs[0]) == 3
    assert runs[16] == pytest.approx(runs[0], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_grpo_run_chunked_equals_plain(tiny_model_dir, arithmetic_dir, tmp_path):
    runs = {}
    for chunk in (0, 8):
        out = tmp_path / f"chunk{chunk}"
        overrides = {
            "model.name_or_path": tiny_model_dir,
            "model.logit_chunk_tokens": chunk,
            "data.train_path": arithmetic_dir / "rl_train.jsonl",
            "data.eval_path": "",
            "grpo.prompts_per_step": 4,
            "grpo.num_generations": 4,
            "grpo.num_iterations": 2,
            "grpo.beta": 0.05,
            "train.output_dir": out,
            "train.max_steps": 3,
            "train.batch_size": 8,
            "train.eval_every": 0,
            "train.save_every": 0,
            "optim.lr": 1e-3,
            "logging.log_every": 1,
            "logging.progress": False,
        }
        args = [f"{k}={v}" for k, v in overrides.items()]
        result = run_cli("grpo", "recipes/grpo_tiny.yaml", *args)
        assert result.returncode == 0, result.stderr
        runs[chunk] = losses(out)
    assert len(runs[0]) == 3
    assert runs[8] == pytest.approx(runs[0], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "config_name, model_name, scaling",
    [
        ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),
        ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
    ],
)
def test_scaled_logits_are_reproduced(config_name, model_name, scaling):
    """Cohere multiplies its logits by logit_scale, Granite divides them by logits_scaling: the
    gate proves the chunked head reproduces both, and the log-probs and gradients agree."""
    import transformers

    config = getattr(transformers, config_name)(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, **scaling,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    rows = rollout_rows(config.vocab_size)

    def compute(m):
        logp = sequence_logprobs(m, *rows, 0.9)
        return [logp], logp.sum()

    compare(model, compute, chunk=4)
