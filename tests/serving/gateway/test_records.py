"""The request-record buffer: bounded, oldest dropped and counted, kept while the database is down."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

import pytest
from django.db import connection
from prometheus_client import REGISTRY

from serving.gateway.app import Gateway, GatewayConfig
from serving.gateway.records import DatabaseDown, RecordBuffer, RecordDraft, records_write
from serving.gateway.routing import RouteRows
from serving.models import RequestRecord


def draft(n: int) -> RecordDraft:
    return RecordDraft(
        request_id=f"req-{n}", created_at=datetime.now(UTC), alias="adder", rollout_id=None, arm="baseline",
        model_version_id=None, engine_worker_id=None, endpoint="chat.completions", stream=True, session_hash="",
        prompt_hash="", prompt_chars=5, status_code=200, outcome="ok", ttft_ms=3.0, e2e_ms=9.0,
    )


def dropped_total() -> float:
    return REGISTRY.get_sample_value("platform_gateway_records_dropped_total") or 0.0


def test_a_full_buffer_drops_the_oldest_and_counts_them() -> None:
    drops: list[int] = []
    buffer = RecordBuffer(3, on_drop=drops.append)
    for n in range(5):
        buffer.add(draft(n))
    assert buffer.dropped == 2
    assert [d.request_id for d in buffer.take(10)] == ["req-2", "req-3", "req-4"]
    assert sum(drops) == 2


def test_a_batch_put_back_goes_first_and_still_respects_the_bound() -> None:
    buffer = RecordBuffer(4)
    for n in range(4):
        buffer.add(draft(n))
    batch = buffer.take(2)  # req-0, req-1 are being written...
    buffer.add(draft(4))
    buffer.add(draft(5))  # ...while two more arrive
    buffer.put_back(batch)  # the write failed: six records for four places
    assert buffer.dropped == 2
    assert [d.request_id for d in buffer.take(10)] == ["req-2", "req-3", "req-4", "req-5"]


def gateway_with(writer: object, *, capacity: int = 3) -> Gateway:
    config = GatewayConfig(record_buffer=capacity, record_batch=2, record_flush_s=0.01, route_poll_s=10.0)
    return Gateway(
        config,
        rows_loader=lambda: RouteRows(version=(1, ""), aliases=(), workers=(), keys=()),
        version_reader=lambda: (1, ""),
        records_writer=writer,  # type: ignore[arg-type]
    )


def test_records_wait_while_the_database_is_down_and_are_written_when_it_is_back() -> None:
    written: list[str] = []
    database_up = False

    def writer(batch: list[RecordDraft]) -> int:
        if not database_up:
            raise DatabaseDown("connection refused")
        written.extend(d.request_id for d in batch)
        return len(batch)

    async def scenario() -> None:
        nonlocal database_up
        gateway = gateway_with(writer, capacity=3)
        await gateway.startup()
        before = dropped_total()
        for n in range(5):
            gateway.recorder.add(draft(n))
        await asyncio.sleep(0.2)
        assert written == []
        assert len(gateway.recorder.buffer) == 3  # the newest three; two dropped and counted
        assert dropped_total() - before == 2
        database_up = True
        await gateway.shutdown()  # the shutdown flush writes what waited

    asyncio.run(scenario())
    assert written == ["req-2", "req-3", "req-4"]


def test_a_batch_being_written_at_shutdown_is_neither_lost_nor_forgotten() -> None:
    attempts: list[list[str]] = []
    thread_free = threading.Event()

    def writer(batch: list[RecordDraft]) -> int:
        attempts.append([d.request_id for d in batch])
        if len(attempts) == 1:
            raise DatabaseDown("connection reset")
        return len(batch)

    async def scenario() -> None:
        gateway = gateway_with(writer, capacity=10)
        await gateway.startup()
        assert gateway.recorder.executor is not None
        gateway.recorder.executor.submit(thread_free.wait)  # the writer thread is busy: the write queues
        gateway.recorder.add(draft(1))
        gateway.recorder.add(draft(2))  # a full batch wakes the flusher, which takes it
        await asyncio.sleep(0.1)
        assert len(gateway.recorder.buffer) == 0
        threading.Timer(0.2, thread_free.set).start()
        await gateway.shutdown()  # stops the flusher while its batch waits for the thread

    asyncio.run(scenario())
    # The queued write ran (it failed), the batch went back, and the shutdown flush wrote it.
    assert attempts == [["req-1", "req-2"], ["req-1", "req-2"]]


@pytest.mark.django_db
def test_records_write_is_safe_to_repeat() -> None:
    batch = [draft(1), draft(2)]
    assert records_write(batch) == 2
    records_write(batch)  # a retried batch whose first commit went through
    assert RequestRecord.objects.filter(request_id__in=["req-1", "req-2"]).count() == 2
    record = RequestRecord.objects.get(request_id="req-1")
    assert (record.ttft_ms, record.e2e_ms, record.outcome) == (3.0, 9.0, "ok")


def refused_total(reason: str) -> float:
    return REGISTRY.get_sample_value("platform_gateway_records_refused_total", {"reason": reason}) or 0.0


@pytest.mark.django_db
def test_a_refused_batch_is_written_row_by_row_and_the_bad_row_is_counted_with_its_reason() -> None:
    bad = draft(2)
    bad.prompt_chars = -1  # against the column's CHECK on both databases: refused on its own
    # PostgreSQL names the SQLSTATE condition; SQLite only the error's class.
    reason = "check_violation" if connection.vendor == "postgresql" else "integrity_error"
    before = refused_total(reason)
    assert records_write([draft(1), bad, draft(3)]) == 2
    assert set(RequestRecord.objects.values_list("request_id", flat=True)) == {"req-1", "req-3"}
    assert refused_total(reason) - before == 1


@pytest.mark.django_db
def test_a_prompt_with_a_nul_byte_keeps_its_record() -> None:
    record = draft(1)
    record.prompt_text = "before\x00after"
    assert records_write([record]) == 1
    assert RequestRecord.objects.get(request_id="req-1").prompt_text == "before\ufffdafter"


@pytest.mark.django_db
def test_a_deleted_model_version_leaves_its_records_with_no_version() -> None:
    """The records' model version has no constraint in the database (it cost the writer); deleting a version
    still sets its records' field to NULL, and records of other versions keep theirs."""
    from serving.models import ModelVersion

    gone, kept = (ModelVersion.objects.create(name="adder", version=v, artifact=f"/models/adder-{v}", served_model_name="adder")
                  for v in ("v1", "v2"))  # fmt: skip
    drafts = [draft(1), draft(2)]
    drafts[0].model_version_id, drafts[1].model_version_id = gone.pk, kept.pk
    assert records_write(drafts) == 2
    gone.delete()
    assert dict(RequestRecord.objects.values_list("request_id", "model_version_id")) == {"req-1": None, "req-2": kept.pk}
