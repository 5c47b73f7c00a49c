"""Lineage of a model version: what exactly would be served, as hashes.

Two versions with the same lineage hash serve the same weights with the same tokenizer, chat template
and sampling defaults, whatever they are called."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model")
CHUNK = 1 << 20


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files_digest(root: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(_file_digest(path).encode())
    return digest.hexdigest()


def _json_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _chat_template(root: Path) -> str:
    jinja = root / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    config = root / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
        return json.dumps(template, sort_keys=True) if template is not None else ""
    return ""


def lineage_of(artifact: str, *, sampling_defaults: dict[str, Any]) -> dict[str, str]:
    """Component hashes and their combined `lineage_hash`. A hub id (no local directory) hashes its name."""
    root = Path(artifact)
    if root.is_dir():
        generation = root / "generation_config.json"
        parts = {
            "weights": _files_digest(root, [p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES]),
            "tokenizer": _files_digest(root, [root / n for n in TOKENIZER_FILES if (root / n).exists()]),
            "chat_template": hashlib.sha256(_chat_template(root).encode()).hexdigest(),
            "sampling": _json_digest(
                {"generation_config": json.loads(generation.read_text()) if generation.exists() else {},
                 "defaults": sampling_defaults}
            ),
        }
    else:
        parts = {"hub_id": hashlib.sha256(artifact.encode()).hexdigest(), "sampling": _json_digest(sampling_defaults)}
    parts["lineage_hash"] = _json_digest(parts)
    return parts
