"""Request records on their way to the database, from the event loop's side: the bounded buffer
(`records.RecordBuffer`), the background task that writes it in batches (`records.records_write`, in a thread
of its own), and stored texts redacted in another thread before their record joins the buffer. The response
never waits for any of it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from serving.gateway import metrics
from serving.gateway.config import GatewayConfig
from serving.gateway.records import DatabaseDown, RecordBuffer, RecordDraft, records_write

log = logging.getLogger(__name__)

# Stored texts waiting for the redaction thread; past this a record is written without them (counted).
TEXTS_MAX_PENDING = 256


class Recorder:
    def __init__(
        self, config: GatewayConfig, *, writer: Callable[[list[RecordDraft]], int] | None = None
    ) -> None:
        self.config = config
        self.buffer = RecordBuffer(config.record_buffer, on_drop=metrics.records_dropped_total.inc)
        self._writer = writer or records_write
        self.executor: ThreadPoolExecutor | None = None
        self._texts_executor: ThreadPoolExecutor | None = None
        self.texts_pending: set[asyncio.Future[tuple[str, str]]] = set()
        self._wakeup: asyncio.Event | None = None

    def start(self) -> None:
        # One thread keeps one database connection between batches; a locked SQLite file makes a batch wait
        # there up to its busy timeout, never the event loop.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-records")
        # Redaction is pure CPU on regexes (18-25 ms per 100 KB): off the event loop, where it would stall
        # every stream in the process.
        self._texts_executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-redact")
        self._wakeup = asyncio.Event()

    async def run(self) -> None:
        """Forever: write what is buffered, at least every GATEWAY_RECORD_FLUSH_S, at once when a batch is full."""
        assert self._wakeup is not None
        backoff = self.config.record_flush_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=backoff)
            self._wakeup.clear()
            while len(self.buffer):
                if not await self.flush_once():
                    # The database is down: keep the records, try again later, a little less often.
                    backoff = min(backoff * 2, 5.0)
                    break
            else:
                backoff = self.config.record_flush_s

    async def close(self) -> None:
        """After the flusher stopped: the texts still being redacted, then one last chance for the buffer."""
        if self.texts_pending:
            await asyncio.wait(list(self.texts_pending), timeout=10.0)
        deadline = time.monotonic() + 10.0
        while len(self.buffer) and time.monotonic() < deadline:
            if not await self.flush_once():
                break
        if len(self.buffer):
            log.warning("%d request records not written at shutdown", len(self.buffer))
        for executor in (self.executor, self._texts_executor):
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=False)

    async def flush_once(self) -> bool:
        batch = self.buffer.take(self.config.record_batch)
        if not batch:
            return True
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, self._writer, batch)
        try:
            await asyncio.wait([future])  # a cancel (shutdown) ends the wait, never the write
        except asyncio.CancelledError:
            # Stopped mid-write (shutdown): the batch's fate is settled before this task ends. Cancelling
            # the write itself could drop a batch whose thread had not started yet, with nobody to know.
            await asyncio.wait([future])
            self._settle(batch, future)
            raise
        return self._settle(batch, future)

    def _settle(self, batch: list[RecordDraft], future: asyncio.Future[int]) -> bool:
        """Count a written batch, or put a failed one back for the next try; True when it was written."""
        error = future.exception()
        if error is None:
            metrics.records_written_total.inc(future.result())
            metrics.records_buffered.set(len(self.buffer))
            return True
        metrics.record_write_failures_total.inc()
        if not isinstance(error, DatabaseDown):
            log.error("writing request records failed", exc_info=error)
        self.buffer.put_back(batch)
        metrics.records_buffered.set(len(self.buffer))
        return False

    def wake(self) -> None:
        """Write what is buffered now, not at the end of the flusher's wait (or its backoff after a failure)."""
        if self._wakeup is not None:
            self._wakeup.set()

    def add(self, draft: RecordDraft) -> None:
        self.buffer.add(draft)
        size = len(self.buffer)
        metrics.records_buffered.set(size)
        if size >= self.config.record_batch and self._wakeup is not None:
            self._wakeup.set()

    def add_with_texts(self, drafts: list[RecordDraft], prompt: str, output: str) -> None:
        """Redact the stored texts in their own thread, then buffer the records (the final one holds them)."""
        if self._texts_executor is None or len(self.texts_pending) >= TEXTS_MAX_PENDING:
            metrics.texts_unstored_total.inc()
            for draft in drafts:
                self.add(draft)
            return
        future = asyncio.get_running_loop().run_in_executor(
            self._texts_executor, _texts_redact, prompt, output
        )
        self.texts_pending.add(future)

        def redacted(done: asyncio.Future[tuple[str, str]]) -> None:
            self.texts_pending.discard(done)
            if done.cancelled() or done.exception() is not None:
                metrics.texts_unstored_total.inc()
                log.error(
                    "redacting stored texts failed", exc_info=None if done.cancelled() else done.exception()
                )
            else:
                drafts[-1].prompt_text, drafts[-1].output_text = done.result()
            for draft in drafts:
                self.add(draft)

        future.add_done_callback(redacted)


def _texts_redact(prompt: str, output: str) -> tuple[str, str]:
    from serving.redaction import redact_in_slices

    return redact_in_slices(prompt), redact_in_slices(output)
