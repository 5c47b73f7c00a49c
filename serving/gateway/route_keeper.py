"""The route table a gateway process routes on, and how it stays current.

Loaded before the first request is accepted (a gateway never routes on nothing); every GATEWAY_ROUTE_POLL_S a
one-statement read of RouteGeneration tells whether to rebuild it; each table read from the database is also
saved to disk (`lastgood`), and a gateway that cannot reach the database within a few seconds at start-up
serves on that copy and says so (`status`, /readyz) until the database answers again. All database work runs
in one thread of its own, so a slow record batch never delays a route change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from serving.gateway import metrics
from serving.gateway.config import GatewayConfig
from serving.gateway.routing import RouteRows, RouteTable, route_table_build

log = logging.getLogger(__name__)


class RouteKeeper:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        rows_loader: Callable[[], RouteRows] | None = None,
        version_reader: Callable[[], tuple[int, str]] | None = None,
    ) -> None:
        self.config = config
        self.table = RouteTable()
        self.source = "none"  # database | disk
        self.database_error = ""
        self.database_down_since: float | None = None
        self._rows_loader = rows_loader
        self._version_reader = version_reader
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Load the first table: from the database; if it cannot be reached within a few seconds and a
        last-known-good copy is on disk, from that (the poll switches back as soon as the database answers)."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-routes")
        config = self.config
        cache = config.routes_cache
        start = time.monotonic()
        has_cache = cache is not None and cache.exists()
        database_deadline = start + (
            config.startup_database_wait_s if has_cache else config.startup_timeout_s
        )
        while True:
            try:
                await self._reload()
                return
            except Exception as exc:
                self._database_failed(exc)
                if time.monotonic() > database_deadline:
                    if has_cache and await self._from_disk():
                        return
                    if time.monotonic() > start + config.startup_timeout_s:
                        raise
                log.warning("route table not loaded yet; retrying", exc_info=True)
                await asyncio.sleep(0.5)

    async def poll(self) -> None:
        """Forever: rebuild the table when RouteGeneration moves; keep the one in use while the database fails."""
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            await asyncio.sleep(self.config.route_poll_s)
            try:
                version = await loop.run_in_executor(self._executor, self._read_version)
                if version != self.table.version:
                    await self._reload()
                else:
                    self._database_answered()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.route_poll_failures_total.inc()
                self._database_failed(exc)
                if not failing:
                    log.warning("route table poll failed; keeping the table in use", exc_info=True)
                failing = True

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=False)

    def status(self) -> dict[str, Any]:
        """What /readyz says about the routes: their source, generation, and the database as last seen."""
        status: dict[str, Any] = {"source": self.source, "generation": self.table.generation}
        if self.database_error:
            since = datetime.fromtimestamp(self.database_down_since or time.time(), UTC)
            status["database"] = (
                f"unreachable since {since.isoformat(timespec='seconds')}: {self.database_error}"
            )
        else:
            status["database"] = "ok"
        return status

    async def _reload(self) -> None:
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._executor, self._load_rows)
        self.table = route_table_build(rows, self.table)
        self._database_answered()
        metrics.route_generation.set(self.table.generation)
        metrics.route_reloads_total.inc()

    async def _from_disk(self) -> bool:
        from serving.gateway.lastgood import route_rows_restore

        assert self.config.routes_cache is not None
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._executor, route_rows_restore, self.config.routes_cache)
        if rows is None:
            return False
        self.table = route_table_build(rows, self.table)
        self.source = "disk"
        metrics.routes_from_disk.set(1)
        metrics.route_generation.set(self.table.generation)
        log.warning(
            "the database is unreachable (%s); serving the last-known-good route table from %s "
            "(generation %d)",
            self.database_error,
            self.config.routes_cache,
            self.table.generation,
        )
        return True

    def _database_failed(self, exc: BaseException) -> None:
        self.database_error = f"{type(exc).__name__}: {exc}".strip()[:300]
        if self.database_down_since is None:
            self.database_down_since = time.time()

    def _database_answered(self) -> None:
        self.database_error = ""
        self.database_down_since = None
        if self.source == "disk":
            log.info("the database answers again; routes come from it")
        self.source = "database"
        metrics.routes_from_disk.set(0)

    def _load_rows(self) -> RouteRows:
        if self._rows_loader is not None:
            return self._rows_loader()
        from serving.gateway.lastgood import route_rows_save
        from serving.gateway.table import route_rows_load

        rows = route_rows_load()
        cache = self.config.routes_cache
        if cache is not None:
            try:
                route_rows_save(rows, cache)
            except OSError:
                log.warning("the last-known-good route table could not be saved to %s", cache, exc_info=True)
        return rows

    def _read_version(self) -> tuple[int, str]:
        if self._version_reader is not None:
            return self._version_reader()
        from serving.gateway.table import route_version_read

        return route_version_read()
