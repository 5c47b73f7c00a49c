"""Hashes the gateway stores instead of identifiers, shared by whoever must match them (outcome events)."""

from __future__ import annotations

import hashlib


def session_key(secret_key: str) -> bytes:
    """The key of session hashes, derived from SECRET_KEY (blake2b takes at most 64 bytes of key)."""
    return hashlib.sha256(secret_key.encode()).digest()


def session_hash(session_id: str, *, key: bytes) -> str:
    """A `user` field or X-Session-Id as stored: keyed, so a stored hash cannot be turned back into a user
    id by guessing."""
    return hashlib.blake2b(session_id.encode(), key=key[:64], digest_size=16).hexdigest()
