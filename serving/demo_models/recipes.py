"""Recipes of the demo models and the hash that keys the build cache."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

# Bump when the training, tokenizer, chat template or export code changes in a way
# that changes the artifacts: every cached build is then rebuilt, because the hash
# of each recipe includes it.
CODE_VERSION = "demo-models-1"


@dataclass(frozen=True)
class TrainRecipe:
    """A model trained from scratch on the training sums."""

    name: str
    version: str
    description: str
    seed: int
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 50
    weight_decay: float = 0.01
    hidden_size: int = 128
    # head size 32: vLLM's CPU attention refuses 16 (the engine dies on its first request).
    num_heads: int = 4
    num_layers: int = 2
    intermediate_size: int = 256

    def __post_init__(self) -> None:
        _check_common(self.name, self.version)
        for field_name in ("steps", "batch_size", "hidden_size", "num_heads", "num_layers", "intermediate_size"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"{field_name} must be positive, got {getattr(self, field_name)}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be within 0..steps, got {self.warmup_steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.hidden_size // self.num_heads < 32:
            raise ValueError("head size must be at least 32 for vLLM's CPU attention")


@dataclass(frozen=True)
class InflateRecipe:
    """A trained model made bigger and slower without changing a single answer.

    Extra decoder layers have zero o_proj and down_proj, so they add nothing to the
    residual stream; the MLP is widened with zero rows and columns, and
    silu(0) * 0 = 0 adds nothing either. The engine still has to read and multiply
    every one of those weights per token, which is the point.
    """

    name: str
    version: str
    description: str
    base: TrainRecipe
    extra_layers: int
    intermediate_size: int

    def __post_init__(self) -> None:
        _check_common(self.name, self.version)
        if self.extra_layers < 0:
            raise ValueError(f"extra_layers must be >= 0, got {self.extra_layers}")
        if self.intermediate_size < self.base.intermediate_size:
            raise ValueError("intermediate_size cannot be smaller than the base model's")


Recipe = TrainRecipe | InflateRecipe


def _check_common(name: str, version: str) -> None:
    # The name becomes a directory name and a served model name.
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"name must be non-empty and use only letters, digits, '-', '_', '.': {name!r}")
    if not version:
        raise ValueError("version must be non-empty")


def _hashable(recipe: Recipe) -> dict[str, object]:
    # description is prose for people: editing it must not retrain a model.
    fields: dict[str, object] = {"kind": type(recipe).__name__}
    for f in dataclasses.fields(recipe):
        if f.name == "description":
            continue
        value = getattr(recipe, f.name)
        fields[f.name] = recipe_hash(value) if isinstance(value, (TrainRecipe, InflateRecipe)) else value
    return fields


def recipe_hash(recipe: Recipe) -> str:
    """sha256 (hex) of the recipe's fields and CODE_VERSION: the build cache key."""
    payload = json.dumps({"code_version": CODE_VERSION, "recipe": _hashable(recipe)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# Tuned on this repo's 2-core machine (torch 2.13 CPU, 2 threads), where they reach
# exact matches of 0.91 (v1), 0.98 (v2 and v2-slow) and 0.445 (v2-broken). Another
# CPU may round differently and land a little elsewhere; the test's thresholds
# leave room for that. Learning is abrupt here: 250 steps of v2's recipe give
# 0.695, 200 give 0.445, 150 under 0.1.
ADDER_V2 = TrainRecipe(
    name="adder-v2",
    version="v2",
    description="Two-digit adder, fully trained: the better candidate.",
    seed=2,
    steps=600,
    batch_size=128,
    learning_rate=3e-3,
)
DEMO_RECIPES: tuple[Recipe, ...] = (
    TrainRecipe(
        name="adder-v1",
        version="v1",
        description="Two-digit adder, the baseline: good but makes mistakes on some carries.",
        seed=1,
        steps=350,
        batch_size=128,
        learning_rate=3e-3,
    ),
    ADDER_V2,
    InflateRecipe(
        name="adder-v2-slow",
        version="v2-slow",
        description="adder-v2's answers from a model many times its size: same quality, slower tokens.",
        base=ADDER_V2,
        # 77x v2's parameters (25.7M, 103 MB in float32). Through vLLM on 2 busy
        # cores, 16384 wide gave 6x v2's TPOT and a TTFT near a second: more than a
        # latency guardrail needs to see, and twice the build and memory.
        extra_layers=6,
        intermediate_size=8192,
    ),
    TrainRecipe(
        name="adder-v2-broken",
        version="v2-broken",
        description="adder-v2's recipe with a third of the steps: a candidate an eval gate must reject.",
        seed=2,
        steps=200,
        batch_size=128,
        learning_rate=3e-3,
    ),
)
