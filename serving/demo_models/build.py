"""Building the demo models into a cache directory keyed by recipe hash."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from . import data
from .recipes import CODE_VERSION, InflateRecipe, Recipe, TrainRecipe, recipe_hash

Log = Callable[[str], None]

# Written last into a build directory: a directory without it is not a build.
MARKER_FILE = "demo_model.json"
HASH_CHARS = 12
# Greedy by default, so an eval run through the engine is deterministic. A client
# may still ask for sampling explicitly. max_new_tokens is only vLLM's default
# max_tokens: an answer is at most 3 digits, and a bad model must not ramble to
# the end of the context when a request gives no limit.
GENERATION_DEFAULTS = {"do_sample": False, "temperature": 0.0, "max_new_tokens": 8}
# vLLM serves a float32 checkpoint in bfloat16 on CPU unless told otherwise. On a CPU
# without native bf16 (AVX2 only, like this repo's machines) that is also slower:
# oneDNN has no bf16 matmul there and vLLM falls back to plain torch. In float32 the
# engine's greedy answers are the torch answers that exact_match counts (checked:
# 200/200 for v2 and v2-slow; in bf16 3/200 of v2's and 5/200 of v2-broken's differ).
ENGINE_ARGS: tuple[str, ...] = ("--dtype", "float32")


@dataclass(frozen=True)
class BuiltModel:
    """A built demo model, and what is needed to register and serve it."""

    name: str
    version: str
    served_name: str
    description: str
    path: Path
    recipe_hash: str
    exact_match: float
    param_count: int
    # Greedy answers to heldout_sums(), in order, from the saved torch model.
    heldout_answers: tuple[str, ...]
    # Seconds the original build took (not this call's, when cached).
    build_seconds: float
    # True when this call found a complete build and did no training.
    cached: bool
    # Extra vLLM arguments the model is meant to be served with (see ENGINE_ARGS).
    engine_args: tuple[str, ...] = ENGINE_ARGS


def build_dir(out_dir: Path, recipe: Recipe) -> Path:
    return Path(out_dir) / f"{recipe.name}-{recipe_hash(recipe)[:HASH_CHARS]}"


def _read_marker(path: Path, recipe: Recipe) -> dict[str, object] | None:
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    # A 12-character prefix could in principle collide; the marker has the full hash.
    if not isinstance(marker, dict) or marker.get("recipe_hash") != recipe_hash(recipe):
        return None
    return marker


def _built_model(recipe: Recipe, path: Path, marker: dict[str, object], *, cached: bool) -> BuiltModel:
    return BuiltModel(
        name=recipe.name,
        version=recipe.version,
        served_name=recipe.name,
        description=recipe.description,
        path=path,
        recipe_hash=recipe_hash(recipe),
        exact_match=float(marker["exact_match"]),  # type: ignore[arg-type]
        param_count=int(marker["param_count"]),  # type: ignore[call-overload]
        heldout_answers=tuple(marker["heldout_answers"]),  # type: ignore[arg-type]
        build_seconds=float(marker["build_seconds"]),  # type: ignore[arg-type]
        cached=cached,
    )


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # Two processes (make run and a test session, say) may build at once: one
    # trains, the other waits and then finds the finished build.
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json(path: Path, payload: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def demo_model_build(recipe: Recipe, *, out_dir: Path, log: Log = print) -> BuiltModel:
    """Build one model into out_dir/<name>-<hash12>/, or reuse a complete build there."""
    out_dir = Path(out_dir)
    final = build_dir(out_dir, recipe)
    marker = _read_marker(final, recipe)
    if marker is not None:
        log(f"{recipe.name}: cached at {final}")
        return _built_model(recipe, final, marker, cached=True)

    # An inflated model reads its base's build, so the base is built (or found) first,
    # outside this model's lock.
    base = demo_model_build(recipe.base, out_dir=out_dir, log=log) if isinstance(recipe, InflateRecipe) else None

    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir / f".{final.name}.lock"):
        marker = _read_marker(final, recipe)
        if marker is not None:
            log(f"{recipe.name}: built by another process at {final}")
            return _built_model(recipe, final, marker, cached=True)
        # Only a crash (or a hand-made copy) leaves these; we hold the lock, so no
        # live build owns them.
        for stale in out_dir.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)

        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=out_dir))
        try:
            marker = _build_into(recipe, tmp, base=base, log=log)
            marker["build_seconds"] = round(time.monotonic() - started, 2)
            _write_json(tmp / MARKER_FILE, marker)
            # mkdtemp makes the directory 0700 and safetensors writes 0600: an engine
            # run as another user must still read the model. Weights are no secret.
            for item in tmp.iterdir():
                item.chmod(0o644)
            tmp.chmod(0o755)
            # rename is atomic on one filesystem: the final name only ever
            # points at a complete build.
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    built = _built_model(recipe, final, marker, cached=False)
    log(
        f"{recipe.name}: built in {built.build_seconds:.0f}s, exact match {built.exact_match:.3f},"
        f" {built.param_count:,} parameters, at {final}"
    )
    return built


def _build_into(recipe: Recipe, path: Path, *, base: BuiltModel | None, log: Log) -> dict[str, object]:
    # torch and transformers only when there is something to build: a cached
    # run stays fast, and importing the package stays light.
    from . import train
    from .tokenizer import tokenizer_build

    if isinstance(recipe, TrainRecipe):
        log(f"{recipe.name}: training ({recipe.steps} steps of {recipe.batch_size})")
        model = train.model_train(recipe, log=log)
    else:
        assert base is not None
        log(f"{recipe.name}: inflating {base.name} (+{recipe.extra_layers} layers, MLP {recipe.intermediate_size})")
        model = train.model_inflate(train.model_load(base.path), recipe)

    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer_build().save_pretrained(str(path))
    # Written by hand: transformers refuses to save a temperature without
    # do_sample=True, yet vLLM takes its default temperature from this file and
    # ignores do_sample, so without it requests would sample at temperature 1.
    _write_json(path / "generation_config.json", _generation_config())
    param_count = model.num_parameters()
    del model

    # Measured on the saved files, loaded back as an engine would, so a fault in
    # saving shows up here rather than in the first eval.
    log(f"{recipe.name}: evaluating on {len(data.heldout_sums())} held-out sums")
    answers = heldout_answers(path)
    references = [ref for _, ref in data.heldout_sums()]
    exact = sum(a == r for a, r in zip(answers, references, strict=True)) / len(references)
    if base is not None and tuple(answers) != base.heldout_answers:
        differing = sum(a != b for a, b in zip(answers, base.heldout_answers, strict=True))
        raise RuntimeError(f"{recipe.name} answers {differing} held-out sums differently from {base.name}")
    return {
        "name": recipe.name,
        "version": recipe.version,
        "recipe_hash": recipe_hash(recipe),
        "code_version": CODE_VERSION,
        "recipe": asdict(recipe),
        "exact_match": exact,
        "param_count": param_count,
        "heldout_answers": answers,
    }


def _generation_config() -> dict[str, object]:
    from .tokenizer import BOS_ID, EOS_ID, PAD_ID

    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, **GENERATION_DEFAULTS}


def heldout_answers(path: Path, prompts: Sequence[str] | None = None) -> list[str]:
    """Greedy answers of the saved model at path (torch, no engine) to completion prompts.

    Defaults to the held-out prompts, in heldout_sums() order.
    """
    from . import train

    if prompts is None:
        prompts = [prompt for prompt, _ in data.heldout_sums()]
    return train.model_answers(train.model_load(Path(path)), prompts)


def build_demo_models(
    out_dir: Path, *, log: Log = print, recipes: Sequence[Recipe] | None = None
) -> list[BuiltModel]:
    """Build (or reuse) every demo model under out_dir, in recipe order."""
    from .recipes import DEMO_RECIPES

    chosen = DEMO_RECIPES if recipes is None else tuple(recipes)
    started = time.monotonic()
    built = [demo_model_build(recipe, out_dir=Path(out_dir), log=log) for recipe in chosen]
    log(f"demo models ready in {time.monotonic() - started:.1f}s")
    return built
