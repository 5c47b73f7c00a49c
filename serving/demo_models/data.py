"""The demo task's data: two-digit addition, split into training and held-out sums.

Pure Python on purpose: the held-out sums are the first eval dataset, and the code that
seeds it must not have to import torch.
"""
from __future__ import annotations

import random

# Operands run over 10..99 so every prompt has the same length ("<bos>ab+cd="), which
# lets training and evaluation batch without padding the prompt.
OPERAND_MIN = 10
OPERAND_MAX = 99

HELDOUT_SIZE = 200
# A constant, not a recipe field: changing the split changes what every model is
# measured on, so it is versioned with the code (see recipes.CODE_VERSION).
HELDOUT_SEED = 20240601


def prompt_for(a: int, b: int) -> str:
    """The completion prompt of one sum, as a client sends it to /v1/completions."""
    return f"{a}+{b}="


def answer_for(a: int, b: int) -> str:
    return str(a + b)


def _all_pairs() -> list[tuple[int, int]]:
    span = range(OPERAND_MIN, OPERAND_MAX + 1)
    return [(a, b) for a in span for b in span]


def heldout_pairs() -> list[tuple[int, int]]:
    """The held-out operand pairs, in a fixed order."""
    rng = random.Random(HELDOUT_SEED)
    # Sampled from unordered pairs so that b+a of a held-out a+b is never trained on
    # either: a model must add, not recall the mirrored sum.
    unordered = [(a, b) for (a, b) in _all_pairs() if a <= b]
    chosen = rng.sample(unordered, HELDOUT_SIZE)
    # Show each pair in a random operand order, or every held-out prompt would
    # have its smaller operand first.
    return [(a, b) if rng.random() < 0.5 else (b, a) for (a, b) in chosen]


def heldout_sums() -> list[tuple[str, str]]:
    """The held-out eval items as (prompt, reference): ("37+48=", "85")."""
    return [(prompt_for(a, b), answer_for(a, b)) for (a, b) in heldout_pairs()]


def training_pairs() -> list[tuple[int, int]]:
    """Every operand pair whose sum is not held out (in either operand order)."""
    held = {frozenset((a, b)) for (a, b) in heldout_pairs()}
    return [(a, b) for (a, b) in _all_pairs() if frozenset((a, b)) not in held]
