from pathlib import Path

import pytest
import yaml

from posttrain.algorithms import ALGORITHMS
from posttrain.algorithms.sft import SFTRecipe
from posttrain.config import ConfigError, from_dict, load_recipe, parse_override

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def recipe_class(path: Path):
    algorithm = path.name.split("_")[0]
    assert algorithm in ALGORITHMS, f"{path.name}: recipe names start with the algorithm"
    return ALGORITHMS[algorithm][0]


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads(path):
    cfg = load_recipe(recipe_class(path), path)
    assert cfg.model.name_or_path
    assert cfg.train.max_steps > 0


def test_recipes_exist():
    assert any(p.name.startswith("sft_") for p in RECIPES)


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'.*did you mean 'optim.lr'"):
        from_dict(SFTRecipe, {"optim": {"lrr": 1e-3}})
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        from_dict(SFTRecipe, {"trian": {}})


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train.max_steps: expected an integer"):
        from_dict(SFTRecipe, {"train": {"max_steps": "many"}})
    with pytest.raises(
        ConfigError, match=r"train.mixed_precision: 'bf61' is not one of .*did you mean 'bf16'"
    ):
        from_dict(SFTRecipe, {"train": {"mixed_precision": "bf61"}})


def test_overrides_are_typed(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}}))
    cfg = load_recipe(
        SFTRecipe,
        recipe,
        [
            "optim.lr=3e-4",
            "train.max_steps=50",
            "data.packing=true",
            "model.lora.target_modules=[q_proj,v_proj]",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 50
    assert cfg.data.packing is True
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_recipe(SFTRecipe, recipe, ["train.max_steps=1.5"])
    # YAML reads a bare `no` as False; the choice 'no' is what the user meant
    assert (
        load_recipe(SFTRecipe, recipe, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    )
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("optim.lr")


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(SFTRecipe, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(SFTRecipe, bad)


def test_every_field_has_a_docstring():
    """Each config field carries a one-line docstring right after it (the recipe reference)."""
    import ast
    import inspect

    import posttrain.config as config_module

    tree = ast.parse(inspect.getsource(config_module))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), (
                        f"{node.name}.{stmt.target.id} has no docstring"
                    )
