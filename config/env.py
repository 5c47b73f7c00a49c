"""Typed readers for environment variables.

Each reader fails with `EnvError`, whose message is one line naming the variable and what was
expected; the entry points print that line and exit instead of a traceback. Secrets may also be
given as `NAME_FILE`, a path whose contents are the value (Docker and Kubernetes secrets).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


class EnvError(Exception):
    """A configuration value is missing or malformed."""


def env_str(name: str, default: str | None = None, *, secret: bool = False) -> str | None:
    value = os.environ.get(name)
    file_path = os.environ.get(f"{name}_FILE")
    if value is None and file_path:
        try:
            value = Path(file_path).read_text().strip()
        except OSError as exc:
            raise EnvError(f"{name}_FILE: cannot read {file_path!r} ({exc.strerror})") from exc
    if value is None or value == "":
        return default
    return value


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = env_str(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise EnvError(f"{name}: expected an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise EnvError(f"{name}: expected an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise EnvError(f"{name}: expected an integer <= {maximum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = env_str(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise EnvError(f"{name}: expected a number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise EnvError(f"{name}: expected a number >= {minimum}, got {value}")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool) -> bool:
    raw = env_str(name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise EnvError(f"{name}: expected one of 1/0, true/false, yes/no, on/off, got {raw!r}")


def env_list(name: str, default: list[str]) -> list[str]:
    raw = env_str(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_map(name: str, default: dict[str, str], *, value_pattern: str | None = None, value_is: str = "") -> dict[str, str]:
    """`key=value,key=value` (e.g. SLACK_ALIAS_CHANNELS="adder=#adder-rollouts,chat=C0123ABCD"); each value
    must match `value_pattern` when given (`value_is` says what that is, for the error)."""
    raw = env_str(name)
    if raw is None:
        return dict(default)
    out: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise EnvError(f"{name}: expected key=value pairs separated by commas, got {item.strip()!r}")
        if key in out:
            raise EnvError(f"{name}: {key!r} is given twice")
        if value_pattern is not None and not re.fullmatch(value_pattern, value):
            raise EnvError(f"{name}: the value for {key!r} must be {value_is or value_pattern}, got {value!r}")
        out[key] = value
    return out


def cpu_set_parse(text: str) -> frozenset[int]:
    """A Linux CPU list as taskset and cpusets write it ("0", "0,2", "0-3,6") -> the CPU numbers.
    Raises ValueError saying what is wrong."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"{part!r} is not a CPU number or a range like 0-3")
        first, last = int(low), int(high) if sep else int(low)
        if last < first:
            raise ValueError(f"{part!r} runs backwards")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def env_cpus(name: str) -> frozenset[int] | None:
    """A CPU list (see cpu_set_parse), or None when unset."""
    raw = env_str(name)
    if raw is None:
        return None
    try:
        return cpu_set_parse(raw)
    except ValueError as exc:
        raise EnvError(f"{name}: expected a CPU list such as 0 or 0-3,6: {exc}") from None


def generated_secret(path: Path, *, nbytes: int = 32) -> str:
    """A secret generated once and kept in `path`, for the embedded default only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(nbytes)
    # Write-then-rename so two processes starting at once agree on one value.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(value + "\n")
    tmp.chmod(0o600)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


@dataclass(frozen=True)
class DatabaseUrl:
    engine: str
    name: str
    user: str = ""
    password: str = ""
    host: str = ""
    port: str = ""
    options: dict[str, str] | None = None


_PG_SCHEMES = {"postgres", "postgresql", "pgsql", "postgresql+psycopg"}


def parse_database_url(name: str, raw: str) -> DatabaseUrl:
    """`postgres://user:password@host:port/db?sslmode=require` or `sqlite:///absolute/path.db`."""
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise EnvError(f"{name}: expected postgres://user:password@host:port/db or sqlite:////absolute/path.db, got {raw!r}") from None
    if parts.scheme in _PG_SCHEMES:
        db = unquote(parts.path.lstrip("/"))
        if not parts.hostname or not db:
            raise EnvError(f"{name}: expected postgres://user:password@host:port/db (host and database name required), got {raw!r}")
        options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        return DatabaseUrl(
            engine="django.db.backends.postgresql",
            name=db,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            host=parts.hostname,
            port=str(port or ""),
            options=options,
        )
    if parts.scheme == "sqlite":
        # sqlite:///relative.db and sqlite:////absolute/path.db, as SQLAlchemy and dj-database-url read them.
        path = unquote(parts.path)[1:]
        if not path:
            raise EnvError(f"{name}: expected sqlite:///relative/path.db or sqlite:////absolute/path.db, got {raw!r}")
        return DatabaseUrl(engine="django.db.backends.sqlite3", name=path)
    raise EnvError(f"{name}: expected a postgres:// or sqlite:/// URL, got {raw!r}")


_BROKER_SCHEMES = {"redis", "rediss", "amqp", "amqps", "pyamqp", "filesystem", "memory"}


def check_broker_url(name: str, raw: str) -> str:
    scheme = raw.split("://", 1)[0] if "://" in raw else ""
    if scheme not in _BROKER_SCHEMES:
        raise EnvError(f"{name}: expected a redis://, amqp:// or filesystem:// URL, got {raw!r}")
    return raw


def database_fingerprint(database: dict[str, Any]) -> str:
    """A short name for a database (engine, host, port, name): files kept per database are named by it."""
    parts = [str(database.get(k) or "") for k in ("ENGINE", "HOST", "PORT", "NAME")]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]
