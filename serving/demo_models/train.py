"""Training, evaluation and inflation of the demo models with torch (CPU).

Imported lazily by build.py: importing the package for its data or recipes must not
pay for torch and transformers.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import data
from .recipes import InflateRecipe, TrainRecipe
from .tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, PAD_ID, VOCAB, encode_plain

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM


def _import_torch_with_passive_waits() -> None:
    # libgomp reads OMP_WAIT_POLICY once, when torch loads it. Its default spins
    # at every barrier, and when the other core is busy (an engine, a test run)
    # a training step was measured 12x slower with 2 threads (1363 ms instead of
    # 116 ms with one); passive waiting brought it to 187 ms. The variable is put
    # back at once so that processes started later (engines) keep their own
    # setting. Nothing can be done once torch is already loaded.
    if "torch" in sys.modules:
        return
    before = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import torch  # noqa: F401
    finally:
        if before is None:
            del os.environ["OMP_WAIT_POLICY"]
        else:
            os.environ["OMP_WAIT_POLICY"] = before


_import_torch_with_passive_waits()

import torch  # noqa: E402

# "<bos>ab+cd=" is 7 tokens for every pair; the answer is 2 or 3 digits and <eos>.
PROMPT_TOKENS = 7
MAX_ANSWER_TOKENS = 4
SEQUENCE_TOKENS = PROMPT_TOKENS + MAX_ANSWER_TOKENS
# Threads are fixed, not taken from the machine: float reductions split differently
# across thread counts, and the recipe hash promises the same weights for the same
# recipe on the same kind of CPU.
TRAIN_THREADS = 2

Log = Callable[[str], None]


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    # The caller may be a long-lived process (a Django command, a test session):
    # put its setting back afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def llama_config(*, hidden_size: int, num_heads: int, num_layers: int, intermediate_size: int) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=MAX_LENGTH,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def _training_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token labels; only answer tokens and <eos> are learnt."""
    rows, labels = [], []
    for a, b in data.training_pairs():
        seq = [BOS_ID, *encode_plain(data.prompt_for(a, b) + data.answer_for(a, b)), EOS_ID]
        seq += [PAD_ID] * (SEQUENCE_TOKENS - len(seq))
        target = seq[1:]
        # The prompt is given, not predicted: learning to guess random operands is
        # wasted capacity. Padding after <eos> is ignored too.
        mask = [i >= PROMPT_TOKENS - 1 and tok != PAD_ID for i, tok in enumerate(target)]
        rows.append(seq[:-1])
        labels.append([tok if keep else -100 for tok, keep in zip(target, mask, strict=True)])
    return torch.tensor(rows), torch.tensor(labels)


def _learning_rate(step: int, recipe: TrainRecipe) -> float:
    # Linear warm-up then cosine decay to a tenth: the usual shape, and short
    # runs still end on a small step size.
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def model_train(recipe: TrainRecipe, *, log: Log) -> LlamaForCausalLM:
    """Train one model from scratch, deterministically for a given recipe."""
    from transformers import LlamaForCausalLM

    with _torch_threads(TRAIN_THREADS), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        config = llama_config(
            hidden_size=recipe.hidden_size,
            num_heads=recipe.num_heads,
            num_layers=recipe.num_layers,
            intermediate_size=recipe.intermediate_size,
        )
        # eager attention: at these sizes sdpa's dispatch costs more than it saves.
        config._attn_implementation = "eager"
        model = LlamaForCausalLM(config)
        model.train()
        inputs, labels = _training_tensors()
        generator = torch.Generator().manual_seed(recipe.seed)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay, betas=(0.9, 0.98)
        )
        order = torch.randperm(len(inputs), generator=generator)
        cursor = 0
        started = time.monotonic()
        recent = []
        for step in range(recipe.steps):
            if cursor + recipe.batch_size > len(order):
                order = torch.randperm(len(inputs), generator=generator)
                cursor = 0
            batch = order[cursor : cursor + recipe.batch_size]
            cursor += recipe.batch_size
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, recipe)
            logits = model(input_ids=inputs[batch]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[batch].reshape(-1), ignore_index=-100
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            recent.append(loss.item())
            if (step + 1) % max(1, recipe.steps // 5) == 0 or step + 1 == recipe.steps:
                log(
                    f"{recipe.name}: step {step + 1}/{recipe.steps} loss {sum(recent) / len(recent):.4f}"
                    f" ({time.monotonic() - started:.0f}s)"
                )
                recent = []
        model.eval()
        return model


@torch.no_grad()
def model_answers(model: LlamaForCausalLM, prompts: Sequence[str]) -> list[str]:
    """Greedy answers of a model to completion prompts like "37+48=".

    The text before <eos>, or everything generated if no <eos> came within the
    answer budget (then it is wrong anyway, as an engine would return it too).
    """
    if not prompts:
        return []
    with _torch_threads(TRAIN_THREADS):
        encoded = [[BOS_ID, *encode_plain(p)] for p in prompts]
        if len({len(e) for e in encoded}) != 1:
            raise ValueError("prompts must all have the same length (two-digit sums)")
        ids = torch.tensor(encoded)
        # With the KV cache each step feeds one token, not the whole sequence:
        # 3.4x less work, which matters for the inflated model.
        out = model(input_ids=ids, use_cache=True)
        for step in range(MAX_ANSWER_TOKENS):
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_ids], dim=1)
            if step + 1 < MAX_ANSWER_TOKENS:
                out = model(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True)
    id_to_char = {i: ch for ch, i in VOCAB.items()}
    answers = []
    for row in ids[:, len(encoded[0]) :].tolist():
        out = []
        for tok in row:
            if tok == EOS_ID:
                break
            out.append(id_to_char[tok])
        answers.append("".join(out))
    return answers


def model_load(path: Path) -> LlamaForCausalLM:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
    model.eval()
    return model


def model_inflate(base: LlamaForCausalLM, recipe: InflateRecipe) -> LlamaForCausalLM:
    """A bigger model that computes exactly what base computes (see InflateRecipe)."""
    from transformers import LlamaForCausalLM

    old = base.config
    if old.num_hidden_layers != recipe.base.num_layers or old.intermediate_size != recipe.base.intermediate_size:
        raise ValueError("base model does not match the recipe's base")
    config = llama_config(
        hidden_size=old.hidden_size,
        num_heads=old.num_attention_heads,
        num_layers=old.num_hidden_layers + recipe.extra_layers,
        intermediate_size=recipe.intermediate_size,
    )
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    width = old.intermediate_size
    with torch.no_grad():
        # Start from zero everywhere, norms at one, then copy what was trained.
        for name, param in model.named_parameters():
            param.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        model.model.embed_tokens.weight.copy_(base.model.embed_tokens.weight)
        model.model.norm.weight.copy_(base.model.norm.weight)
        model.lm_head.weight.copy_(base.lm_head.weight)
        # strict=False on purpose: the layers beyond the base's stay all zero.
        for new, src in zip(model.model.layers, base.model.layers, strict=False):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(new.self_attn, proj).weight.copy_(getattr(src.self_attn, proj).weight)
            new.input_layernorm.weight.copy_(src.input_layernorm.weight)
            new.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight)
            new.mlp.gate_proj.weight[:width].copy_(src.mlp.gate_proj.weight)
            new.mlp.up_proj.weight[:width].copy_(src.mlp.up_proj.weight)
            new.mlp.down_proj.weight[:, :width].copy_(src.mlp.down_proj.weight)
    model.eval()
    return model
