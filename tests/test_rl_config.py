"""Recipe keys that GRPO / DAPO / Kimi accept are honoured or rejected by name; moved keys say
where they went; refill draws never collide."""

import pytest
import torch
from cli_helpers import REPO
from test_grpo import build, rl_overrides

from posttrain.algorithms.dapo import refill_indices
from posttrain.algorithms.grpo import GRPORecipe
from posttrain.algorithms.kimi import KimiRecipe
from posttrain.config import ConfigError, load_recipe


@pytest.mark.parametrize("recipe", ["grpo_tiny.yaml", "kimi_tiny.yaml"])
def test_grad_accum_is_rejected_naming_the_algorithm(
    tiny_model_dir, arithmetic_dir, tmp_path, recipe
):
    name = recipe.split("_")[0]
    with pytest.raises(ConfigError, match=rf"^{name}: train.grad_accum=2 is not used"):
        build(tiny_model_dir, arithmetic_dir, tmp_path, recipe, **{"train.grad_accum": 2})


def test_data_max_length_truncates_prompts_from_the_left(tiny_model_dir, arithmetic_dir, tmp_path):
    """data.max_length bounds prompt + completion: with 6 new tokens and max_length 10, every
    prompt keeps its last 4 tokens, and the metric counts the cut prompts."""
    algo, acc, model = build(tiny_model_dir, arithmetic_dir, tmp_path, **{"data.max_length": 10})
    batch = algo.micro_batches(0, acc, model)[0]
    assert batch.prompt_ids.shape[1] == 4 and bool(batch.prompt_mask.bool().all())
    full = algo.tokenizer.apply_chat_template(
        list(algo.data.prompts[algo.step_prompts(0)[0]]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert batch.prompt_ids[0].tolist() == list(full)[-4:]  # the END of the prompt is kept
    assert algo.on_step_end(model, 0, acc)["prompts_truncated"] == 1.0
    with pytest.raises(ConfigError, match="grpo: data.max_length=6 .* no room"):
        build(tiny_model_dir, arithmetic_dir, tmp_path, **{"data.max_length": 6})


def test_default_max_length_cuts_no_prompt(tiny_model_dir, arithmetic_dir, tmp_path):
    algo, acc, model = build(tiny_model_dir, arithmetic_dir, tmp_path)
    algo.micro_batches(0, acc, model)
    assert algo.on_step_end(model, 0, acc)["prompts_truncated"] == 0.0


def test_refill_draws_never_collide():
    """Rounds of one step draw disjoint prompts; different steps use different keys; the draws
    reach the whole data set (the old key step*16+round reused step s+1's round 0 at round 16
    of step s and used 1/16 of each epoch)."""
    n, count = 1000, 16
    rounds = [refill_indices(n, 0, 5, r, count) for r in range(1, 20)]
    flat = [i for draw in rounds for i in draw]
    assert len(set(flat)) == len(flat)  # 19 rounds x 16 < 1000: no repeats within the step
    assert refill_indices(n, 0, 5, 1, count) == rounds[0]  # deterministic on every process
    assert refill_indices(n, 0, 6, 1, count) != rounds[0]
    assert refill_indices(n, 1, 5, 1, count) != rounds[0]
    seen = {i for step in range(400) for i in refill_indices(n, 0, step, 1, count)}
    assert len(seen) > 0.99 * n


def test_kimi_warmup_logs_the_weight_it_trains_with(tiny_model_dir, arithmetic_dir, tmp_path):
    """At step 0 of a 10-step warm-up the length reward has weight 0: the logged rewards/mean is
    the accuracy reward alone, which is what the loss trains on."""
    algo, acc, model = build(
        tiny_model_dir,
        arithmetic_dir,
        tmp_path,
        "kimi_tiny.yaml",
        **{"kimi.length_penalty_weight": 0.5, "kimi.length_penalty_warmup_steps": 10},
    )
    batches = algo.micro_batches(0, acc, model)
    metrics = algo.on_step_end(model, 0, acc)
    trained = torch.cat([b.rewards for b in batches])
    assert metrics["kimi_length_weight"] == 0.0
    assert metrics["rewards/mean"] == pytest.approx(float(trained.mean()))
    assert metrics["rewards/mean"] == pytest.approx(metrics["rewards/accuracy/mean"])
    assert algo.length_weight(5) == pytest.approx(0.25) and algo.length_weight(20) == 0.5


@pytest.mark.parametrize(
    ("recipe_cls", "override", "message"),
    [
        (GRPORecipe, "grpo.dynamic_sampling=true", "'grpo.dynamic_sampling' moved to 'dapo."),
        (GRPORecipe, "grpo.max_refill_rounds=2", "'grpo.max_refill_rounds' moved to 'dapo."),
        (GRPORecipe, "grpo.tau=0.5", "'grpo.tau' moved to 'kimi.tau"),
        (GRPORecipe, "grpo.prioritized_sampling=true", "moved to 'kimi.prioritized_sampling"),
        (GRPORecipe, "grpo.loss_type=kimi", "run `posttrain kimi` with a `kimi:` section"),
        (KimiRecipe, "grpo.tau=0.5", "kimi: the settings moved from the 'grpo' section"),
    ],
)
def test_moved_keys_name_their_new_place(recipe_cls, override, message):
    recipe = "kimi_tiny.yaml" if recipe_cls is KimiRecipe else "grpo_tiny.yaml"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_recipe(recipe_cls, REPO / "recipes" / recipe, [override])


def test_every_bundled_rl_recipe_loads(tiny_model_dir, arithmetic_dir, tmp_path):
    for name in ("grpo_tiny.yaml", "grpo_tiny_dapo.yaml", "grpo_tiny_lora_kl.yaml"):
        load_recipe(GRPORecipe, REPO / "recipes" / name, [])
    cfg = load_recipe(
        KimiRecipe,
        REPO / "recipes/kimi_tiny.yaml",
        rl_overrides(tiny_model_dir, arithmetic_dir, tmp_path, "kimi"),
    )
    assert cfg.kimi.prioritized_sampling and cfg.kimi.tau == 0.5
