"""Redaction of known PII before any prompt or output is stored."""

from __future__ import annotations

import re

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("[EMAIL]", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")),
    # API keys and bearer tokens: long runs of key-like characters, optionally behind a known prefix.
    ("[API_KEY]", re.compile(r"\b(?:sk|pk|rk|xox[abposr]|ghp|gho|rmp|gw|AKIA)[-_][A-Za-z0-9_-]{12,}\b")),
    ("[API_KEY]", re.compile(r"\b[A-Za-z0-9_-]{32,}\b")),
    # Card numbers: 13-19 digits with optional spaces or dashes (checked with Luhn below).
    ("[CARD]", re.compile(r"\b(?:\d[ -]?){12,18}\d\b")),
    ("[PHONE]", re.compile(r"(?<![\w+])\+?\d{1,3}?[ .-]?\(?\d{2,4}\)?[ .-]?\d{3,4}[ .-]?\d{3,4}\b")),
)


def _luhn_ok(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()]
    checksum = 0
    for index, digit in enumerate(reversed(digits)):
        if index % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        checksum += digit
    return len(digits) >= 13 and checksum % 10 == 0


def redact(text: str) -> str:
    for placeholder, pattern in _PATTERNS:
        if placeholder == "[CARD]":
            text = pattern.sub(lambda m: "[CARD]" if _luhn_ok(m.group(0)) else m.group(0), text)
        else:
            text = pattern.sub(placeholder, text)
    return text
