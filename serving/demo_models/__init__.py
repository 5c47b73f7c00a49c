"""Tiny Llama models trained here on two-digit addition, for demos, evals and tests.

No Django here: the management command that registers the models calls
build_demo_models() and stores what it returns.

    from serving.demo_models import build_demo_models, heldout_sums
    for model in build_demo_models(Path("var/demo-models")):
        ...  # model.served_name, model.path, model.exact_match, ...
"""
from __future__ import annotations

from .build import BuiltModel, build_demo_models, build_dir, demo_model_build, heldout_answers
from .data import heldout_sums
from .recipes import CODE_VERSION, DEMO_RECIPES, InflateRecipe, Recipe, TrainRecipe, recipe_hash

__all__ = [
    "CODE_VERSION",
    "DEMO_RECIPES",
    "BuiltModel",
    "InflateRecipe",
    "Recipe",
    "TrainRecipe",
    "build_demo_models",
    "build_dir",
    "demo_model_build",
    "heldout_answers",
    "heldout_sums",
    "recipe_hash",
]
