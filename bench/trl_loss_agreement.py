"""posttrain's losses against TRL's on one shared input: value and gradient agreement.

    python bench/trl_loss_agreement.py        (needs the bench extra: TRL >= 1.16)

Where TRL has the same loss (GSPO via importance_sampling_level="sequence", CISPO, RLOO,
KTO, ORPO, robust DPO) both are computed on the same seeded tensors and the largest absolute
difference of the loss value and of its gradient with respect to the policy log-probs is
printed. TRL computes most of these inside large trainer methods that also run the model, so
this script executes TRL's own source block for the loss (found in the installed trainer by
the first and last line below, dedented) with the shared tensors bound to its variable names
and a `self` holding only the settings the block reads. A marker that is not found stops the
script with the method named: a new TRL release moved the code and the markers need updating.

Settings mapped between the two (same maths, different parameterisation):
- GSPO: TRL loss_type="grpo" with importance_sampling_level="sequence" (per-sequence mean of a
  per-sequence value) is posttrain's gspo; ε = 3e-4 / 4e-4 on both.
- CISPO: TRL clamps the ratio at `epsilon_high` = 5 (an absolute cap, ScaleRL's ε_max); ours
  is clip(ρ, 1-ε_low, 1+ε_high) with ε_low = 1, ε_high = 4, i.e. the same cap of 5.
- ORPO: TRL's NLL is a token mean over the batch's chosen tokens, ours a per-pair mean; the
  chosen answers here have equal lengths, where the two agree (see losses/orpo.py).
"""

from __future__ import annotations

import inspect
import textwrap
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from posttrain.losses.advantages import rloo_advantages
from posttrain.losses.dpo import PreferenceLogps, robust_loss
from posttrain.losses.gspo import cispo_loss, gspo_loss
from posttrain.losses.kto import kto_loss
from posttrain.losses.orpo import odds_ratio_loss


def trl_block(obj, first: str, last: str, occurrence: int = 1, first_occurrence: int = 1) -> str:
    """Source lines of `obj` from the `first_occurrence`-th line containing `first` to the
    `occurrence`-th line after it containing `last`."""
    lines = inspect.getsource(obj).splitlines()
    try:
        starts = (i for i, line in enumerate(lines) if first in line)
        for _ in range(first_occurrence):
            start = next(starts)
        ends = (i for i in range(start, len(lines)) if last in lines[i])
        for _ in range(occurrence):
            end = next(ends)
    except StopIteration:
        raise SystemExit(
            f"{obj.__qualname__}: marker {first!r} .. {last!r} not found; TRL changed"
        ) from None
    return textwrap.dedent("\n".join(lines[start : end + 1]))


def run_block(code: str, namespace: dict) -> dict:
    namespace = {"torch": torch, "F": F, **namespace}
    exec(compile(code, "<trl block>", "exec"), namespace)  # TRL's own code, shared tensors
    return namespace


def shared_policy_input(seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    n, t = 8, 6
    old = -torch.rand(n, t, generator=g) * 3 - 0.1  # (N, T) π_old log-probs
    logprobs = old + torch.randn(n, t, generator=g) * scale  # π_θ
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()  # (N, T) right-padded
    rewards = torch.randint(0, 3, (n,), generator=g).float()
    # any sequence advantages will do; not summing to 0 keeps the loss value informative
    advantages = torch.randn(n, generator=g)
    return logprobs, old, mask, advantages, rewards


def grpo_trainer_loss(loss_type, level, eps_low, eps_high, logprobs, old, mask, advantages):
    from trl.trainer.grpo_trainer import GRPOTrainer

    # from the ratio to the end of the aggregation (the second "Unknown loss type" raise)
    code = trl_block(
        GRPOTrainer._compute_loss,
        "log_ratio = per_token_logps - old_per_token_logps",
        "Unknown loss type",
        occurrence=2,
    )
    per_token_logps = logprobs.clone().requires_grad_(True)
    settings = SimpleNamespace(
        importance_sampling_level=level,
        beta=0.0,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        off_policy_mask_threshold=None,
        use_vllm=False,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False),
        model=SimpleNamespace(training=False),  # eval: no accumulation rescaling
        accelerator=SimpleNamespace(num_processes=1),
        current_gradient_accumulation_steps=1,
        max_completion_length=logprobs.shape[1],
    )
    ns = run_block(
        code,
        {
            "self": settings,
            "per_token_logps": per_token_logps,
            "old_per_token_logps": old,
            "mask": mask,
            "advantages": advantages.unsqueeze(1),
            "entropy_mask": None,
            "inputs": {"num_items_in_batch": mask.sum().float()},
        },
    )
    ns["loss"].backward()
    return ns["loss"].detach(), per_token_logps.grad


def ours(fn, logprobs, *args, **kwargs):
    x = logprobs.clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    (out.total / out.units).backward()
    return (out.total / out.units).detach(), x.grad


NOTES: dict[str, str] = {}


def compare_gspo():
    logprobs, old, mask, adv, _ = shared_policy_input(0, scale=1e-3)
    a = ours(gspo_loss, logprobs, old, adv, mask, 3e-4, 4e-4)
    b = grpo_trainer_loss("grpo", "sequence", 3e-4, 4e-4, logprobs, old, mask, adv)
    clipped = gspo_loss(logprobs, old, adv, mask, 3e-4, 4e-4).metrics["clip_fraction"]
    NOTES["gspo"] = f"{float(clipped):.0%} of sequences clipped"
    return a, b


def control_token_level():
    """Sensitivity check: GSPO against TRL's TOKEN-level grpo must NOT agree."""
    logprobs, old, mask, adv, _ = shared_policy_input(0, scale=1e-3)
    a = ours(gspo_loss, logprobs, old, adv, mask, 3e-4, 4e-4)
    b = grpo_trainer_loss("grpo", "token", 3e-4, 4e-4, logprobs, old, mask, adv)
    return a, b


def compare_cispo():
    logprobs, old, mask, adv, _ = shared_policy_input(1, scale=1.0)
    a = ours(cispo_loss, logprobs, old, adv, mask, 1.0, 4.0)
    b = grpo_trainer_loss("cispo", "token", 0.2, 5.0, logprobs, old, mask, adv)
    capped = cispo_loss(logprobs, old, adv, mask, 1.0, 4.0).metrics["clip_fraction_high"]
    NOTES["cispo"] = f"{float(capped):.0%} of tokens capped"
    return a, b


def compare_rloo():
    from trl.trainer import rloo_trainer

    _, _, _, _, rewards = shared_policy_input(2, scale=0.0)
    code = trl_block(
        rloo_trainer.RLOOTrainer._generate_and_score_completions,
        "grouped_rewards = rewards.view(-1, num_generations)",
        "advantages = torch.nan_to_num(advantages, nan=0.0)",
    )
    ns = run_block(
        code,
        {
            "rewards": rewards.clone(),
            "num_generations": 4,
            "nanstd": rloo_trainer.nanstd,
            "self": SimpleNamespace(normalize_advantages=False),
        },
    )
    return (rloo_advantages(rewards, 4), None), (ns["advantages"], None)


def compare_kto():
    from trl.trainer.kto_trainer import KTOTrainer

    g = torch.Generator().manual_seed(3)
    policy = -torch.rand(8, generator=g) * 20
    ref = policy + torch.randn(8, generator=g)
    kl_policy = -torch.rand(8, generator=g) * 20
    kl_ref = kl_policy - torch.rand(8, generator=g)  # positive KL estimate
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    weights = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.5}

    x = policy.clone().requires_grad_(True)
    out = kto_loss(x, ref, kl_policy, kl_ref, desirable, weights["beta"],
                   weights["desirable_weight"], weights["undesirable_weight"])  # fmt: skip
    (out.total / out.units).backward()
    mine = ((out.total / out.units).detach(), x.grad)

    # the second `if self.calculate_KL:` opens the KL estimate; the block ends in torch.cat(
    code = trl_block(
        KTOTrainer._compute_loss,
        "if self.calculate_KL:",
        "self.undesirable_weight * rejected_losses",
        first_occurrence=2,
    )
    code += "\n    0,\n)\nloss = losses.nanmean()"
    y = policy.clone().requires_grad_(True)
    settings = SimpleNamespace(
        calculate_KL=True,
        loss_type="kto",
        accelerator=SimpleNamespace(gather_for_metrics=lambda t: t, device="cpu"),
        **weights,
    )
    ns = run_block(
        code,
        {
            "self": settings,
            "KL_logps": kl_policy,
            "ref_KL_logps": kl_ref,
            "chosen_logps": y[desirable],
            "rejected_logps": y[~desirable],
            "ref_chosen_logps": ref[desirable],
            "ref_rejected_logps": ref[~desirable],
        },
    )
    ns["loss"].backward()
    return mine, (ns["loss"].detach(), y.grad)


def compare_orpo():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(4)
    lengths = torch.full((6,), 5.0)  # equal chosen lengths: TRL's token-mean NLL == ours
    chosen = -torch.rand(6, generator=g) * 10 - 0.5  # summed log-probs
    rejected = -torch.rand(6, generator=g) * 10 - 0.5
    lam = 0.1

    x = chosen.clone().requires_grad_(True)
    out = odds_ratio_loss(x, rejected, lengths, lengths, lam)
    (out.total / out.units).backward()
    mine = ((out.total / out.units).detach(), x.grad)

    y = chosen.clone().requires_grad_(True)
    fake = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device="cpu"))
    losses, *_ = ORPOTrainer.odds_ratio_loss(fake, y / lengths, rejected / lengths)
    nll = -(y / lengths).mean()  # TRL's cross-entropy over the (equal-length) chosen tokens
    loss = nll - losses.mean()
    loss.backward()
    return mine, (loss.detach(), y.grad)


def compare_robust():
    from trl.trainer.dpo_trainer import DPOTrainer

    g = torch.Generator().manual_seed(5)
    logps = [-torch.rand(6, generator=g) * 20 for _ in range(4)]
    x = logps[0].clone().requires_grad_(True)
    out = robust_loss(PreferenceLogps(x, logps[1], logps[2], logps[3]), 0.5, 0.2)
    (out.total / out.units).backward()
    mine = ((out.total / out.units).detach(), x.grad)

    code = trl_block(
        DPOTrainer._compute_loss,
        'elif loss_type == "robust":',
        "per_sequence_loss = (clean_loss_term - flipped_loss_term)",
    )
    code = "\n".join(code.splitlines()[1:])  # the branch's body
    y = logps[0].clone().requires_grad_(True)
    delta = (y - logps[2]) - (logps[1] - logps[3])
    ns = run_block(
        textwrap.dedent(code),
        {"self": SimpleNamespace(beta=0.5, label_smoothing=0.2), "delta_score": delta},
    )
    loss = ns["per_sequence_loss"].mean()
    loss.backward()
    return mine, (loss.detach(), y.grad)


CASES = {
    "gspo (TRL grpo, importance_sampling_level=sequence)": compare_gspo,
    "cispo": compare_cispo,
    "rloo advantages": compare_rloo,
    "kto": compare_kto,
    "orpo": compare_orpo,
    "robust dpo (label_smoothing 0.2)": compare_robust,
    "control: gspo vs TRL token-level grpo (must differ)": control_token_level,
}


def main() -> dict:
    import trl

    print(f"posttrain vs TRL {trl.__version__}: max |difference| on one shared input")
    print(f"{'loss':<55} {'posttrain':>12} {'TRL':>12} {'value diff':>11} {'grad diff':>11}")
    results = {}
    for name, compare in CASES.items():
        torch.manual_seed(0)
        (value_a, grad_a), (value_b, grad_b) = compare()
        value_diff = float((value_a - value_b).abs().max())
        grad_diff = None if grad_a is None else float((grad_a - grad_b).abs().max())
        results[name] = {"value_diff": value_diff, "grad_diff": grad_diff}
        shown_a = float(value_a) if value_a.numel() == 1 else float(value_a.abs().sum())
        shown_b = float(value_b) if value_b.numel() == 1 else float(value_b.abs().sum())
        grad = "-" if grad_diff is None else f"{grad_diff:.2e}"
        note = next((v for k, v in NOTES.items() if name.startswith(k)), "")
        print(
            f"{name:<55} {shown_a:>12.6f} {shown_b:>12.6f} {value_diff:>11.2e} {grad:>11}  {note}"
        )
    return results


if __name__ == "__main__":
    main()
