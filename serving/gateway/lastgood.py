"""The last-known-good route table on disk: what the database said last, so a gateway can start, and keep
serving, while the database is unreachable.

Written (atomically: a temporary file renamed over the old one) after each table read from the database,
read only when start-up cannot reach it. It holds what the route table holds: aliases, engine URLs (and
the bearer keys of static endpoints), and gateway key hashes, so it is readable by its owner only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from serving.gateway.routing import AliasRow, KeyRow, RouteRows, VersionRow, WorkerRow

log = logging.getLogger(__name__)

FORMAT = 1


def route_rows_save(rows: RouteRows, path: Path) -> None:
    data = {"format": FORMAT, "rows": asdict(rows)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def route_rows_restore(path: Path) -> RouteRows | None:
    """The saved rows, or None when there are none (or they cannot be read: said in the log)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("the last-known-good route table %s cannot be read: %s", path, exc)
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        log.error("the last-known-good route table %s has an unknown format; ignored", path)
        return None
    try:
        return _rows(data["rows"])
    except (KeyError, TypeError, ValueError) as exc:
        log.error("the last-known-good route table %s is malformed: %s", path, exc)
        return None


def _rows(raw: dict[str, Any]) -> RouteRows:
    def version(v: dict[str, Any]) -> VersionRow:
        return VersionRow(**v)

    aliases = tuple(
        AliasRow(
            **{
                **a,
                "baseline": version(a["baseline"]),
                "candidate": version(a["candidate"]) if a.get("candidate") else None,
            }
        )
        for a in raw["aliases"]
    )
    # JSON gives lists back; the rows hold tuples (a list of key headers cannot be added to a replica's).
    workers = tuple(
        WorkerRow(**{**w, "headers": tuple(w["headers"]) if w.get("headers") is not None else None})
        for w in raw["workers"]
    )
    keys = tuple(KeyRow(**{**k, "aliases": tuple(k["aliases"])}) for k in raw["keys"])
    generation, changed_at = raw["version"]
    return RouteRows(version=(int(generation), str(changed_at)), aliases=aliases, workers=workers, keys=keys)
