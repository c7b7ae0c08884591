"""Package layout that pyproject.toml cannot express: the top-level recipes/ folder ships inside
the package as `posttrain.recipes` (package data), so `posttrain demo` finds its recipes after
a non-editable install while recipes/ stays where users of a checkout expect it."""

from setuptools import find_packages, setup

RECIPES = {"posttrain.recipes": "recipes", "posttrain.recipes.accelerate": "recipes/accelerate"}

setup(
    packages=[*find_packages(include=["posttrain", "posttrain.*"]), *RECIPES],
    package_dir=RECIPES,
    package_data={name: ["*.yaml"] for name in RECIPES},
)
