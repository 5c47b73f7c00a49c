"""Reading an eval suite from JSONL, line by line, all or nothing (pure Python).

One JSON object a line:
    {"id": "s1", "prompt": "37+48=", "reference": "85", "tags": ["carry"]}
    {"messages": [{"role": "user", "content": "What is 2+2?"}], "reference": "4"}
Exactly one of `prompt` (sent to /v1/completions) or `messages` (sent to /v1/chat/completions);
`reference` (a string or a number), `tags` (strings), `id` (unique in the file) and `metadata` (an object)
are optional. Blank lines are skipped. Every bad line is reported with its number and the reason."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_BYTES = 5 * 1024 * 1024
MAX_ITEMS = 10_000
MAX_LINE_BYTES = 64 * 1024
MAX_TAGS = 20
MAX_REPORTED_ERRORS = 50
ROLES = ("system", "user", "assistant")
KEYS = {"id", "prompt", "messages", "reference", "tags", "metadata"}
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")


@dataclass(frozen=True)
class ParsedItem:
    position: int
    key: str
    prompt: str
    messages: list[dict[str, str]] | None
    reference: str | None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def canonical(self) -> dict[str, Any]:
        return {"key": self.key, "prompt": self.prompt, "messages": self.messages, "reference": self.reference,
                "tags": self.tags, "metadata": self.metadata}


@dataclass(frozen=True)
class LineError:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}" if self.line else self.reason


class SuiteFormatError(ValueError):
    """The upload is refused; `errors` lists every bad line found (up to MAX_REPORTED_ERRORS)."""

    def __init__(self, errors: list[LineError]) -> None:
        self.errors = errors
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{errors[0]}{more}")


def _item(raw: Any, *, position: int) -> ParsedItem:
    if not isinstance(raw, dict):
        raise ValueError("each line must be a JSON object")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(KEYS))})")
    prompt, messages = raw.get("prompt"), raw.get("messages")
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of 'prompt' or 'messages'")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError("'prompt' must be a non-empty string")
    if messages is not None:
        messages = _messages(messages)
    reference = raw.get("reference")
    if isinstance(reference, bool) or not isinstance(reference, (str, int, float, type(None))):
        raise ValueError("'reference' must be a string or a number")
    tags = raw.get("tags", [])
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        raise ValueError(f"'tags' must be a list of at most {MAX_TAGS} strings")
    for tag in tags:
        if not isinstance(tag, str) or not _TAG.match(tag):
            raise ValueError(f"tag {tag!r} must be 1-64 letters, digits or _ . : / - (starting with a letter or digit)")
    key = raw.get("id", position + 1)
    if isinstance(key, bool) or not isinstance(key, (str, int)) or not str(key).strip() or len(str(key)) > 128:
        raise ValueError("'id' must be a non-empty string or integer of at most 128 characters")
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError("'metadata' must be an object")
    return ParsedItem(
        position=position, key=str(key), prompt=prompt or "", messages=messages,
        reference=None if reference is None else str(reference), tags=sorted(set(tags)), metadata=metadata,
    )


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise ValueError(f"messages[{index}] must be an object with 'role' and 'content' only")
        if message.get("role") not in ROLES:
            raise ValueError(f"messages[{index}].role must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{index}].content must be a string")
        clean.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "user" for m in clean):
        raise ValueError("'messages' needs at least one user message")
    return clean


def parse_suite_jsonl(data: bytes | str) -> list[ParsedItem]:
    """Every item of a JSONL upload, or SuiteFormatError listing the bad lines (nothing half-read)."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_BYTES:
        raise SuiteFormatError([LineError(0, f"the file is {len(raw)} bytes; the limit is {MAX_BYTES}")])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SuiteFormatError([LineError(line, "not UTF-8 text")]) from exc
    return parse_lines(text.splitlines())


def parse_lines(lines: Iterable[str]) -> list[ParsedItem]:
    items: list[ParsedItem] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
        if len(line.encode()) > MAX_LINE_BYTES:
            errors.append(LineError(number, f"the line is longer than {MAX_LINE_BYTES} bytes"))
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(LineError(number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        try:
            item = _item(value, position=len(items))
        except ValueError as exc:
            errors.append(LineError(number, str(exc)))
            continue
        if item.key in seen:
            errors.append(LineError(number, f"id {item.key!r} was already used on line {seen[item.key]}"))
            continue
        seen[item.key] = number
        items.append(item)
        if len(items) > MAX_ITEMS:
            errors.append(LineError(number, f"more than {MAX_ITEMS} items"))
            break
    if errors:
        raise SuiteFormatError(errors)
    if not items:
        raise SuiteFormatError([LineError(0, "the file holds no items")])
    return items


def items_hash(items: Iterable[ParsedItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item.canonical(), sort_keys=True, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()
