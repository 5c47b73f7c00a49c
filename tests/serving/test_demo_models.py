"""The demo models: quality thresholds, the build cache, tokenizer and chat template.

Builds into DEMO_MODELS_DIR (default var/demo-models in the repo), so after the
first run, or after `make run`, this reuses the cache and takes seconds. No engine
is started here; the serving integration tests run the models in vLLM.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings

from serving.demo_models import (
    DEMO_RECIPES,
    BuiltModel,
    TrainRecipe,
    build_demo_models,
    build_dir,
    demo_model_build,
    heldout_answers,
    heldout_sums,
    recipe_hash,
)
from serving.demo_models.data import training_pairs
from serving.demo_models.tokenizer import BOS_ID, EOS_ID, UNK_ID, tokenizer_load


@pytest.fixture(scope="module")
def out_dir() -> Path:
    return Path(settings.DEMO_MODELS_DIR)  # the cache the rest of the suite uses: built once per machine


@pytest.fixture(scope="module")
def built(out_dir: Path) -> dict[str, BuiltModel]:
    return {model.name: model for model in build_demo_models(out_dir, log=lambda line: None)}


def test_heldout_sums_are_fixed_and_never_trained_on() -> None:
    sums = heldout_sums()
    assert len(sums) == 200
    assert sums == heldout_sums()
    for prompt, ref in sums:
        a, b = prompt.removesuffix("=").split("+")
        assert prompt.endswith("=") and int(a) + int(b) == int(ref)
    trained = {frozenset(pair) for pair in training_pairs()}
    held = {frozenset(map(int, prompt[:-1].split("+"))) for prompt, _ in sums}
    assert not trained & held


def test_every_demo_model_is_built(built: dict[str, BuiltModel]) -> None:
    assert set(built) >= {"adder-v1", "adder-v2", "adder-v2-slow", "adder-v2-broken"}
    for model in built.values():
        for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
            assert (model.path / name).is_file(), f"{model.name} lacks {name}"
        assert model.path.name == f"{model.name}-{model.recipe_hash[:12]}"


def test_quality_thresholds(built: dict[str, BuiltModel]) -> None:
    v1, v2 = built["adder-v1"], built["adder-v2"]
    slow, broken = built["adder-v2-slow"], built["adder-v2-broken"]
    assert v1.exact_match >= 0.85
    assert v2.exact_match > v1.exact_match
    assert slow.heldout_answers == v2.heldout_answers
    assert slow.exact_match == v2.exact_match
    # Far enough below v1 that an exact McNemar test on 200 paired items rejects it.
    assert broken.exact_match <= v1.exact_match - 0.25


def test_exact_match_is_what_the_saved_files_answer(built: dict[str, BuiltModel]) -> None:
    references = [ref for _, ref in heldout_sums()]
    for name in ("adder-v2", "adder-v2-slow"):
        answers = heldout_answers(built[name].path)
        assert tuple(answers) == built[name].heldout_answers
        assert sum(a == r for a, r in zip(answers, references, strict=True)) / len(references) == built[name].exact_match


def test_slow_model_is_several_times_bigger(built: dict[str, BuiltModel]) -> None:
    assert built["adder-v2-slow"].param_count >= 10 * built["adder-v2"].param_count


def test_second_build_is_a_cache_hit(built: dict[str, BuiltModel], out_dir: Path) -> None:
    again = build_demo_models(out_dir, log=lambda line: None)
    assert all(model.cached for model in again)
    assert [(m.name, m.path, m.exact_match) for m in again] == [
        (built[m.name].name, built[m.name].path, built[m.name].exact_match) for m in again
    ]


def test_recipe_hash_ignores_description_but_not_training() -> None:
    import dataclasses

    recipe = DEMO_RECIPES[0]
    assert recipe_hash(dataclasses.replace(recipe, description="reworded")) == recipe_hash(recipe)
    assert recipe_hash(dataclasses.replace(recipe, steps=recipe.steps + 1)) != recipe_hash(recipe)
    assert len({recipe_hash(r) for r in DEMO_RECIPES}) == len(DEMO_RECIPES)


@pytest.mark.parametrize("content", ["37+48", "37+48=", " 37 + 48 = ", [{"type": "text", "text": "37+48"}]])
def test_chat_template_gives_the_trained_prompt(built: dict[str, BuiltModel], content: object) -> None:
    tokenizer = tokenizer_load(built["adder-v2"].path)
    messages = [{"role": "system", "content": "You add."}, {"role": "user", "content": content}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos>37+48="
    # Chat prompts are tokenised without special tokens (vLLM's default for chat),
    # completion prompts with them: both must give the same ids.
    assert tokenizer(prompt, add_special_tokens=False).input_ids == tokenizer("37+48=").input_ids


def test_tokenizer_round_trip(built: dict[str, BuiltModel]) -> None:
    tokenizer = tokenizer_load(built["adder-v1"].path)
    ids = tokenizer("37+48=").input_ids
    assert ids[0] == BOS_ID and len(ids) == 7
    assert tokenizer.decode(ids, skip_special_tokens=True) == "37+48="
    answer = [*tokenizer("85", add_special_tokens=False).input_ids, EOS_ID]
    assert tokenizer.decode(answer, skip_special_tokens=True) == "85"
    # Text the model never saw still tokenises, as <unk>, instead of failing.
    assert UNK_ID in tokenizer("what is 2+2?").input_ids


def test_an_interrupted_build_is_not_taken_for_a_cached_one(tmp_path: Path) -> None:
    tiny = TrainRecipe(name="tiny", version="t", description="", seed=0, steps=2, batch_size=8,
                       learning_rate=1e-3, warmup_steps=1)
    final = build_dir(tmp_path, tiny)
    # What a crash leaves: a temporary directory, or (copied by hand) files without the marker.
    (tmp_path / f".tmp-{final.name}-crashed").mkdir()
    final.mkdir()
    (final / "config.json").write_text("{}")

    first = demo_model_build(tiny, out_dir=tmp_path, log=lambda line: None)
    assert not first.cached and (final / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*"))
    again = demo_model_build(tiny, out_dir=tmp_path, log=lambda line: None)
    assert again.cached and again.heldout_answers == first.heldout_answers
