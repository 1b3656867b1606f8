"""The record state machine and the journal writer, without sockets."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from keepstream import JournalConfig
from keepstream._journal import (
    JournalWriter,
    MemoryBackend,
    NoneBackend,
    SQLiteBackend,
    open_backend,
)
from keepstream._record import Record, new_stream_id, record_json
from keepstream._state import (
    TERMINAL,
    Ending,
    InvalidTransition,
    Status,
    check_transition,
    pick_ending,
    terminal_status,
)


def test_transitions() -> None:
    for status in TERMINAL:
        check_transition(Status.OPEN, status)
        for other in Status:
            with pytest.raises(InvalidTransition):
                check_transition(status, other)
    with pytest.raises(InvalidTransition):
        check_transition(Status.OPEN, Status.OPEN)


def test_ending_precedence() -> None:
    assert pick_ending([Ending.UPSTREAM_DONE, Ending.CANCEL_REQUESTED]) is Ending.CANCEL_REQUESTED
    assert pick_ending([Ending.UPSTREAM_FAILED, Ending.SHUTDOWN]) is Ending.SHUTDOWN
    assert pick_ending([Ending.DEADLINE, Ending.UPSTREAM_FAILED]) is Ending.DEADLINE
    assert terminal_status(Ending.CLIENT_GONE_CANCEL) is Status.CANCELLED
    with pytest.raises(ValueError, match="no known cause"):
        pick_ending([])


def test_record_finishes_once() -> None:
    rec = Record(id=new_stream_id(), instance="i", route="/", method="GET", path="/x")
    rec.finish(Status.COMPLETED, None)
    with pytest.raises(InvalidTransition):
        rec.finish(Status.CANCELLED, "late")
    js = record_json(rec.row())
    assert js["status"] == "completed" and js["ended_at"].endswith("Z")
    assert js["client_gone_at"] is None and js["detached"] is False


def test_stream_ids_sort_by_time() -> None:
    ids = [new_stream_id() for _ in range(50)]
    assert all(len(i) == 32 for i in ids) and len(set(ids)) == 50


def _rec(instance: str = "a") -> Record:
    return Record(id=new_stream_id(), instance=instance, route="/", method="GET", path="/")


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_writer_batches_and_commit_is_durable(kind: str, tmp_path: Path) -> None:
    # Real clock: SQLite work runs in threads, which a MockClock would race past.
    url = f"sqlite:///{tmp_path / 'j.db'}" if kind == "sqlite" else "memory:"
    backend = open_backend(url)
    writer = JournalWriter(backend, JournalConfig(url=url, flush_interval_ms=100,
                                                  flush_bytes=1 << 20))
    await writer.setup("a")
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        rec = _rec()
        await writer.commit(rec)
        assert (await writer.get(rec.id)) is not None
        for i in range(100):
            writer.append(rec, b"%d," % i)
            rec.bytes += len(b"%d," % i)
        if kind == "memory":
            # Not yet flushed: the 100 ms interval has not passed (no await since the appends).
            row = await writer.get(rec.id)
            assert row is not None and row["bytes"] == 0
        with trio.fail_after(5):
            while rec.durable < rec.bytes:  # the flush runs after the interval, in a thread
                await trio.sleep(0.01)
        row = await writer.get(rec.id)
        assert row is not None and row["bytes"] == rec.bytes
        rec.finish(Status.COMPLETED, None)
        writer.append(rec, b"end")
        await writer.commit(rec)
        row = await writer.get(rec.id)
        assert row is not None and row["status"] == "completed"
        body = await writer.read_body(rec.id)
        assert body == b"".join(b"%d," % i for i in range(100)) + b"end"
        assert row["bytes"] == len(body)
        assert await writer.read_body(rec.id, 5, 4) == body[5:9]
        nursery.cancel_scope.cancel()
    assert backend.integrity_check() == []
    backend.close()


async def test_flush_bytes_triggers_early_flush(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    writer = JournalWriter(backend, JournalConfig(url="memory:", flush_interval_ms=10_000,
                                                  flush_bytes=1000))
    await writer.setup("a")
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        rec = _rec()
        writer.append(rec, b"x" * 1500)
        t0 = trio.current_time()
        while rec.durable < 1500:
            await trio.sleep(0.001)
        assert trio.current_time() - t0 < 1.0
        nursery.cancel_scope.cancel()


def test_sqlite_recovery_orphans_only_other_instances(tmp_path: Path) -> None:
    path = str(tmp_path / "j.db")
    b = SQLiteBackend(path)
    b.setup()
    from keepstream._journal import Batch

    dead, live = _rec("dead"), _rec("me")
    done = _rec("dead")
    done.finish(Status.COMPLETED, None)
    b.commit(Batch(rows=[dead.row(), live.row(), done.row()],
                   chunks=[(dead.id, 0, b"abc")]))
    b.commit(Batch(rows=[{**dead.row(), "bytes": 3}]))
    b.close()
    b2 = SQLiteBackend(path)
    b2.setup()
    assert b2.recover("me") == 1
    d = b2.get(dead.id)
    assert d is not None and d["status"] == "orphaned" and d["bytes"] == 3
    assert b2.read_body(dead.id) == b"abc"
    assert b2.get(live.id)["status"] == "open"  # type: ignore[index]
    assert b2.get(done.id)["status"] == "completed"  # type: ignore[index]
    assert b2.integrity_check() == []
    b2.close()


def test_none_backend_keeps_only_live_rows() -> None:
    b = NoneBackend()
    from keepstream._journal import Batch

    r = _rec()
    b.commit(Batch(rows=[r.row()], chunks=[(r.id, 0, b"x")]))
    assert b.get(r.id) is not None and b.read_body(r.id) == b""
    r.finish(Status.COMPLETED, None)
    b.commit(Batch(rows=[r.row()]))
    assert b.get(r.id) is None


def test_owner_alive_tells_live_instances_from_gone_ones() -> None:
    import os
    import subprocess
    import sys

    from keepstream._record import new_instance_id, owner_alive

    me = new_instance_id()
    assert owner_alive(me)
    host, pid, start, rand = me.split("/")
    assert pid == str(os.getpid())
    assert not owner_alive(f"{host}/{pid}/{int(start) + 1}/{rand}")  # pid reused later
    assert not owner_alive(f"another-host/{pid}/{start}/{rand}")
    assert not owner_alive("old-format-1234-abcd")
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    assert not owner_alive(f"{host}/{done.stdout.strip()}/{start}/{rand}")  # exited


def test_recovery_keeps_a_live_siblings_open_records(tmp_path: Path) -> None:
    from keepstream._journal import Batch, SQLiteBackend
    from keepstream._record import new_instance_id

    backend = SQLiteBackend(str(tmp_path / "j.db"))
    backend.setup()
    try:
        live = Record(id="a" * 32, instance=new_instance_id(), route="/", method="GET",
                      path="/x")
        dead = Record(id="b" * 32, instance="gone-host/1/1/ff", route="/", method="GET",
                      path="/y")
        backend.commit(Batch(rows=[live.row(), dead.row()]))
        assert backend.recover("someone-else") == 1
        statuses = {r["id"]: r["status"] for r in backend.list_records(None, 10)}
        assert statuses == {"a" * 32: "open", "b" * 32: "orphaned"}
    finally:
        backend.close()
