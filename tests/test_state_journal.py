"""The record state machine and the journal writer, without sockets."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keepstream._journal as journal_mod
from keepstream import JournalConfig
from keepstream._errors import JournalError
from keepstream._journal import (
    _SCHEMA,
    Batch,
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


def test_sqlite_updates_a_stored_row_and_rewrites_one_gone_since(tmp_path: Path) -> None:
    """A row an earlier commit stored takes an UPDATE of the columns that change; every one of
    them must land, and a row deleted meanwhile (by hand, say) is written whole again."""
    backend = SQLiteBackend(str(tmp_path / "j.db"))
    backend.setup()
    rec = _rec()
    backend.commit(Batch(rows=[rec.row()], stored=[False]))
    rec.upstream_status, rec.first_byte_at, rec.bytes, rec.events = 200, 5.5, 3, 1
    rec.detached, rec.last_event_id, rec.owner, rec.client_gone_at = True, "e1", "h", 6.5
    rec.finish(Status.COMPLETED, "done", now=7.5)
    backend.commit(Batch(rows=[rec.row()], chunks=[(rec.id, 0, b"abc", 1, "e1")],
                         stored=[True]))
    assert backend.get(rec.id) == rec.row() | {"detached": 1}
    other = _rec()
    backend.commit(Batch(rows=[other.row()]))
    with sqlite3.connect(tmp_path / "j.db") as conn:
        conn.execute("DELETE FROM streams WHERE id = ?", (rec.id,))
    other.bytes = 9
    backend.commit(Batch(rows=[rec.row(), other.row()], stored=[True, True]))
    assert backend.get(rec.id) == rec.row() | {"detached": 1}
    got = backend.get(other.id)
    assert got is not None and got["bytes"] == 9
    backend.close()


class CountingSQLite(SQLiteBackend):
    """Counts commits by path: inline (on the event loop) or threaded."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.inline = self.threaded_commits = self.checkpoints = 0

    def try_commit_inline(self, batch: Batch) -> bool:
        done = super().try_commit_inline(batch)
        self.inline += done
        return done

    def commit(self, batch: Batch) -> None:
        self.threaded_commits += 1
        super().commit(batch)

    def checkpoint(self) -> None:
        self.checkpoints += 1
        super().checkpoint()


async def _sqlite_writer(
    tmp_path: Path, backend_type: type[CountingSQLite] = CountingSQLite, flush_interval_ms: int = 20
) -> tuple[Any, JournalWriter]:
    """A set-up writer on a fresh SQLite file (``backend_type``, counting its commits)."""
    db = tmp_path / "j.db"
    backend = backend_type(str(db))
    writer = JournalWriter(backend, JournalConfig(url=f"sqlite:///{db}",
                                                  flush_interval_ms=flush_interval_ms))
    await writer.setup("a")
    return backend, writer


async def test_small_commits_are_inline_and_a_locked_journal_falls_back_to_a_thread(
    tmp_path: Path,
) -> None:
    """A record's creation and terminal commit run on the event loop (no worker thread);
    with the database locked by another connection they take the threaded path, which waits
    for the lock (busy_timeout) without blocking the event loop, and land once it is free."""
    db = tmp_path / "j.db"
    backend, writer = await _sqlite_writer(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        with trio.fail_after(10):
            for _ in range(20):
                rec = _rec()
                await writer.commit(rec)  # durable creation
                writer.append(rec, b"data: x\n\n")
                rec.bytes += 9
                rec.finish(Status.COMPLETED, None)
                await writer.commit(rec)
                assert (await writer.get(rec.id) or {})["status"] == "completed"
        assert backend.inline == 40 and backend.threaded_commits == 0
        locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        await trio.to_thread.run_sync(locker.execute, "BEGIN EXCLUSIVE")
        rec = _rec()
        landed = trio.Event()

        async def create() -> None:
            await writer.commit(rec)
            landed.set()

        nursery.start_soon(create)
        ticks = 0
        with trio.fail_after(10):
            while ticks < 20:  # the event loop keeps running meanwhile
                await trio.sleep(0.01)
                ticks += 1
            assert not landed.is_set()
            await trio.to_thread.run_sync(locker.execute, "ROLLBACK")
            await landed.wait()
        locker.close()
        assert backend.threaded_commits >= 1
        assert (await writer.get(rec.id)) is not None
        nursery.cancel_scope.cancel()
    backend.close()


async def test_commit_now_is_durable_on_return_or_says_it_must_wait(tmp_path: Path) -> None:
    """``commit_now`` (what a stream's creation and end try before arming a timeout): True
    only when the row is in the database on return; False, doing nothing lasting, when the
    database is locked, and then :meth:`commit` still makes it durable once it is free."""
    db = tmp_path / "j.db"
    backend, writer = await _sqlite_writer(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        rec = _rec()
        assert writer.commit_now(rec)
        assert backend.get(rec.id) is not None  # durable, synchronously
        locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        await trio.to_thread.run_sync(locker.execute, "BEGIN EXCLUSIVE")
        other = _rec()
        tried = backend.inline
        assert not writer.commit_now(other)
        assert not writer.commit_now(other)  # refused once: no new try until a commit lands
        assert backend.inline == tried
        await trio.to_thread.run_sync(locker.execute, "ROLLBACK")
        with trio.fail_after(10):
            await writer.commit(other)
        assert backend.get(other.id) is not None
        other.finish(Status.COMPLETED, None)
        assert writer.commit_now(other)  # a commit landed: inline again
        assert (backend.get(other.id) or {})["status"] == "completed"
        locker.close()
        nursery.cancel_scope.cancel()
    backend.close()


class SlowCheckpointSQLite(CountingSQLite):
    """A checkpoint that blocks until released: a disk sync that takes its time."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.in_checkpoint = threading.Event()
        self.release = threading.Event()

    def checkpoint(self) -> None:
        self.in_checkpoint.set()
        self.release.wait(10)
        super().checkpoint()


@pytest.mark.parametrize("holder", ["checkpoint", "other-connection"])
async def test_commits_while_the_writer_is_held_take_the_batch_once(
    tmp_path: Path, holder: str,
) -> None:
    """Many streams ending while the database is held (a drain during a checkpoint's slow disk
    sync, or another connection's write lock): each terminal commit must not gather and put
    back the whole pending set (that was quadratic: 1,000 streams built 500,000 rows). They
    wait for the next flush, and that one transaction makes every one of them durable."""
    n = 200
    db = tmp_path / "j.db"
    backend, writer = await _sqlite_writer(tmp_path, SlowCheckpointSQLite, flush_interval_ms=5)
    rows_taken = 0
    take = writer._take_batch

    def counting_take() -> tuple[Batch, list[Any]]:
        nonlocal rows_taken
        batch, entries = take()
        rows_taken += len(batch.rows)
        return batch, entries

    writer._take_batch = counting_take  # type: ignore[method-assign]
    locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        recs = [_rec() for _ in range(n)]
        with trio.fail_after(20):
            for rec in recs:
                await writer.commit(rec)  # created, inline
            if holder == "checkpoint":
                backend.checkpoint_bytes = 1  # the flush loop's next commit checkpoints
                writer.append(recs[0], b"data: x\n\n")
                recs[0].bytes += 9
                await trio.to_thread.run_sync(backend.in_checkpoint.wait, 10)
            else:
                await trio.to_thread.run_sync(locker.execute, "BEGIN EXCLUSIVE")
            rows_taken = 0
            done = 0

            async def finish(rec: Record) -> None:
                nonlocal done
                rec.finish(Status.INTERRUPTED, "shutdown")
                await writer.commit(rec)
                done += 1

            for rec in recs:
                nursery.start_soon(finish, rec)
            await trio.testing.wait_all_tasks_blocked()
            assert done == 0  # none durable while the database is held
            # Before: about n * n / 2. During a checkpoint no inline try is made at all; a
            # refused one is tried once, then the flush loop takes the whole set once.
            assert rows_taken <= (0 if holder == "checkpoint" else 2 * n), rows_taken
            if holder == "checkpoint":
                backend.release.set()
            else:
                await trio.to_thread.run_sync(locker.execute, "ROLLBACK")
            while done < n:
                await trio.sleep(0.01)
        assert rows_taken <= 3 * n, rows_taken
        nursery.cancel_scope.cancel()
    locker.close()
    for rec in recs:
        row = backend.get(rec.id)
        assert row is not None and row["status"] == "interrupted", row
    backend.close()


async def test_a_row_touched_after_an_inline_commit_waits_for_the_flush_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    """Short streams one after another (each: a durable creation, a touched row, a durable
    end, all inline): a row touched after an inline commit waits for the flush interval, as
    every change does. Before, the touch ended the flush loop's interval wait at once, so
    every other stream paid one more SQLite transaction for its touched row."""
    backend, writer = await _sqlite_writer(tmp_path, flush_interval_ms=10_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        n = 20
        for _ in range(n):
            rec = _rec()
            await writer.commit(rec)  # created, inline
            rec.upstream_status = 200
            writer.touch(rec)  # the response head: no hurry
            await trio.sleep(0.001)
            rec.finish(Status.COMPLETED, None)
            await writer.commit(rec)
            await trio.sleep(0.001)
        assert backend.threaded_commits == 0
        assert backend.inline == 2 * n, backend.inline  # the commits' own, no flush-loop one
        last = _rec()
        await writer.commit(last)
        writer.touch(last)
        last.upstream_status = 201
        t0 = trio.current_time()
        while (backend.get(last.id) or {}).get("upstream_status") != 201:
            await trio.sleep(0.5)
        waited = trio.current_time() - t0
        assert 9.0 <= waited <= 11.0, waited  # one interval: flushed, not forgotten
        nursery.cancel_scope.cancel()
    backend.close()


async def test_grouped_commits_share_a_transaction(tmp_path: Path) -> None:
    """``grouped`` (set when a drain cuts every live stream at once): terminal commits made in
    the same scheduler pass land in one transaction, not one inline transaction each, and
    every one of them is durable when its ``commit()`` returns."""
    n = 50
    backend, writer = await _sqlite_writer(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        recs = [_rec() for _ in range(n)]
        with trio.fail_after(10):
            for rec in recs:
                await writer.commit(rec)
            assert backend.inline == n  # one inline transaction per commit, ungrouped
            writer.grouped = True
            durable: list[str | None] = []

            async def finish(rec: Record) -> None:
                rec.finish(Status.INTERRUPTED, "shutdown")
                await writer.commit(rec)
                row = backend.get(rec.id)
                durable.append(row["status"] if row else None)

            async with trio.open_nursery() as finishing:
                for rec in recs:
                    finishing.start_soon(finish, rec)
        assert durable == ["interrupted"] * n
        transactions = backend.inline + backend.threaded_commits - n
        assert 1 <= transactions <= 2, transactions
        nursery.cancel_scope.cancel()
    backend.close()


async def test_commit_soon_shares_one_inline_transaction_among_a_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``commit_soon`` (a stream's creation and end): in a burst (an inline commit ended less
    than ``GROUP_WITHIN`` ago) streams that ask in the same scheduler pass share one inline
    transaction, and each is durable when its call returns True; otherwise a stream commits
    at once; when the inline path is closed (a locked database) every one of them says so,
    and ``commit`` still lands them."""
    n = 40
    db = tmp_path / "j.db"
    backend, writer = await _sqlite_writer(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        with trio.fail_after(10):
            monkeypatch.setattr(journal_mod, "GROUP_WITHIN", 0.0)  # never a burst
            alone = _rec()
            assert await writer.commit_soon(alone)
            assert backend.get(alone.id) is not None and backend.inline == 1
            assert writer.grouped_commits == 0
            # Always a burst (the threshold is wall-clock time; a test must not race it).
            monkeypatch.setattr(journal_mod, "GROUP_WITHIN", 3600.0)
            recs = [_rec() for _ in range(n)]
            results: dict[str, tuple[bool, str | None]] = {}

            async def create(rec: Record) -> None:
                ok = await writer.commit_soon(rec)
                row = backend.get(rec.id)  # read at once: durable on return
                results[rec.id] = (ok, row["status"] if row else None)

            async with trio.open_nursery() as burst:
                for rec in recs:
                    burst.start_soon(create, rec)
            assert results == {r.id: (True, "open") for r in recs}
            assert backend.inline == 2 and backend.threaded_commits == 0
            assert writer.grouped_commits == n - 1
            locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            await trio.to_thread.run_sync(locker.execute, "BEGIN EXCLUSIVE")
            assert not writer.commit_now(_rec())  # the inline path is closed from here on
            said: list[bool] = []

            async def end(rec: Record) -> None:
                rec.finish(Status.COMPLETED, None)
                said.append(await writer.commit_soon(rec))

            async with trio.open_nursery() as burst:
                for rec in recs[:5]:
                    burst.start_soon(end, rec)
            assert said == [False] * 5
            await trio.to_thread.run_sync(locker.execute, "ROLLBACK")
            locker.close()
            for rec in recs[:5]:
                await writer.commit(rec)
                assert (backend.get(rec.id) or {})["status"] == "completed"
        nursery.cancel_scope.cancel()
    backend.close()


async def test_the_wal_is_checkpointed_by_the_writer(tmp_path: Path) -> None:
    """Automatic checkpoints are off (they would sync the disk inside an inline commit): the
    writer checkpoints in a thread every ``checkpoint_bytes``, so the WAL stays bounded."""
    db = tmp_path / "j.db"
    backend = CountingSQLite(str(db))
    backend.checkpoint_bytes = 256 * 1024
    writer = JournalWriter(backend, JournalConfig(url=f"sqlite:///{db}", flush_interval_ms=5,
                                                  flush_bytes=32 * 1024))
    await writer.setup("a")
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        rec = _rec()
        await writer.commit(rec)
        piece = b"x" * 4096
        with trio.fail_after(30):
            for _ in range(1024):  # 4 MiB, in flushes of a few pieces
                writer.append(rec, piece)
                rec.bytes += len(piece)
                await trio.sleep(0.001)
            while rec.durable < rec.bytes:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    wal_size = (await trio.Path(str(db) + "-wal").stat()).st_size
    assert backend.checkpoints >= 4, backend.checkpoints
    assert wal_size < 2 * 1024 * 1024, wal_size  # 4 MiB went through it
    backend.close()
    check = SQLiteBackend(str(db))
    check.setup()
    assert check.read_body(rec.id) == piece * 1024
    check.close()


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
                   chunks=[(dead.id, 0, b"abc", 0, None)]))
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
    b.commit(Batch(rows=[r.row()], chunks=[(r.id, 0, b"x", 0, None)]))
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


@pytest.mark.parametrize("kind", ["sqlite", "memory", "none"])
def test_progress_rides_on_the_chunk_and_readers_see_it(kind: str, tmp_path: Path) -> None:
    """A stored open row whose only change is progress gets no row write: its chunk carries
    ``events`` and ``last_event_id`` (``bytes`` is the chunk's end), and ``get`` and
    ``list_records`` show that progress; the rest of the row stays as stored. A row gone
    meanwhile is not brought back by a chunk (its stream's next whole write does that)."""
    backend = open_backend({"sqlite": f"sqlite:///{tmp_path / 'j.db'}", "memory": "memory:",
                            "none": "none"}[kind])
    backend.setup()
    rec, other = _rec(), _rec()
    rec.upstream_status = 200
    backend.commit(Batch(rows=[rec.row(), other.row()], stored=[False, False]))
    before = backend.get(rec.id)
    assert before is not None
    rec.upstream_status = 500  # not progress: a chunk must not carry it
    backend.commit(Batch(chunks=[(rec.id, 0, b"data: 1\n\ndata: 2\n\n", 2, "e2")]))
    want = before | {"bytes": 18, "events": 2, "last_event_id": "e2"}
    assert backend.get(rec.id) == want
    assert [r for r in backend.list_records(None, 10) if r["id"] == rec.id] == [want]
    backend.commit(Batch(chunks=[(rec.id, 18, b"data: 3\n\n", 3, None)]))
    assert backend.get(rec.id) == before | {"bytes": 27, "events": 3, "last_event_id": None}
    if kind == "sqlite":
        # One row written per stream and flush: the streams row itself was not updated.
        with sqlite3.connect(tmp_path / "j.db") as conn:
            raw = conn.execute("SELECT bytes, events, last_event_id FROM streams WHERE id = ?",
                               (rec.id,)).fetchone()
            assert raw == (0, 0, None)
            conn.execute("DELETE FROM streams WHERE id = ?", (other.id,))
        assert backend.integrity_check() == []  # an open row's bytes lag its chunks: fine
    else:
        del backend.rows[other.id]  # type: ignore[attr-defined]
    backend.commit(Batch(chunks=[(other.id, 0, b"x" * 7, 1, None)]))
    assert backend.get(other.id) is None
    other.bytes, other.events = 7, 1
    backend.commit(Batch(rows=[{**other.row(), "bytes": 7}], stored=[True]))
    got = backend.get(other.id)
    assert got is not None and (got["bytes"], got["events"], got["path"]) == (7, 1, "/")
    backend.close()


def test_sqlite_recovery_settles_progress_from_the_last_chunk(tmp_path: Path) -> None:
    """An orphaned record's ``bytes``, ``events`` and ``last_event_id`` are those of its last
    durable chunk (its row's own were as of its last whole write), so its ``bytes`` is its
    committed body's length; a chunk written before the progress moved to the chunks
    (``events`` NULL) leaves the row's events as they were."""
    path = str(tmp_path / "j.db")
    b = SQLiteBackend(path)
    b.setup()
    dead, legacy = _rec("gone-host/1/1/ff"), _rec("gone-host/1/1/ff")
    b.commit(Batch(rows=[dead.row(), {**legacy.row(), "bytes": 4, "events": 1}]))
    b.commit(Batch(chunks=[(dead.id, 0, b"data: a\n\n", 1, None),
                           (legacy.id, 0, b"abcd", None, None)]))  # type: ignore[list-item]
    b.commit(Batch(chunks=[(dead.id, 9, b"id: 7\ndata: b\n\nda", 2, "7")]))
    b.close()
    b2 = SQLiteBackend(path)
    b2.setup()
    assert b2.recover("me") == 2
    with sqlite3.connect(path) as conn:  # written into the rows, not only overlaid on read
        rows = dict(conn.execute("SELECT id, bytes || '/' || events || '/' || "
                                 "coalesce(last_event_id, '-') FROM streams").fetchall())
    assert rows == {dead.id: "26/2/7", legacy.id: "4/1/-"}
    d = b2.get(dead.id)
    assert d is not None and d["status"] == "orphaned"
    assert len(b2.read_body(dead.id)) == d["bytes"] == 26
    assert b2.integrity_check() == []
    b2.close()


def test_sqlite_journal_of_the_older_layout_gets_the_progress_columns(tmp_path: Path) -> None:
    """A journal whose chunks table predates the chunk-row progress opens, gains the two
    columns, keeps its rows' progress and takes new chunks with theirs."""
    path = tmp_path / "old.db"
    rec = _rec()
    with sqlite3.connect(path) as conn:
        conn.executescript(
            _SCHEMA.split("CREATE TABLE IF NOT EXISTS chunks")[0]
            + "CREATE TABLE chunks (stream_id TEXT NOT NULL, offset INTEGER NOT NULL, "
              "data BLOB NOT NULL, PRIMARY KEY (stream_id, offset));")
        row = {**rec.row(), "bytes": 3, "events": 1, "last_event_id": "x"}
        conn.execute(f"INSERT INTO streams ({', '.join(row)}) VALUES "
                     f"({', '.join('?' * len(row))})", tuple(row.values()))
        conn.execute("INSERT INTO chunks VALUES (?, 0, ?)", (rec.id, b"abc"))
    b = SQLiteBackend(str(path))
    b.setup()
    got = b.get(rec.id)
    assert got is not None and (got["bytes"], got["events"], got["last_event_id"]) == (3, 1, "x")
    b.commit(Batch(chunks=[(rec.id, 3, b"de", 2, "y")]))
    got = b.get(rec.id)
    assert got is not None and (got["bytes"], got["events"], got["last_event_id"]) == (5, 2, "y")
    assert b.read_body(rec.id) == b"abcde"
    b.close()


async def test_writer_sends_progress_only_rows_unless_a_field_changed(tmp_path: Path) -> None:
    """Appends alone make a progress row; a ``touch`` (any other field changed) makes the
    next flush write the whole row, also when that flush failed and was retried."""
    backend, writer = await _sqlite_writer(tmp_path, flush_interval_ms=5)
    batches: list[Batch] = []
    take = writer._take_batch
    fail = [False]
    during: Any = None

    def recording_take() -> tuple[Batch, list[Any]]:
        batch, entries = take()
        batches.append(batch)
        return batch, entries

    real_commit = backend.commit

    def commit(batch: Batch) -> None:
        if fail[0]:
            fail[0] = False
            if during is not None:  # a field changes while this (failing) flush is in flight
                trio.from_thread.run_sync(during)
            raise JournalError("injected")
        real_commit(batch)

    def inline(batch: Batch) -> bool:
        return False  # every flush through commit()

    writer._take_batch = recording_take  # type: ignore[method-assign]
    backend.commit = commit
    backend.try_commit_inline = inline
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        with trio.fail_after(10):
            rec = _rec()
            await writer.commit(rec)  # created: a whole row
            batches.clear()
            writer.append(rec, b"data: 1\n\n")
            rec.bytes, rec.events, rec.last_event_id = 9, 1, "1"
            await writer.commit(_rec())  # a flush (with another record's creation)
            mine = [c for b in batches for c in b.chunks if c[0] == rec.id]
            # (an inline try the test refuses takes a batch too: the same one)
            assert mine and set(mine) == {(rec.id, 0, b"data: 1\n\n", 1, "1")}
            assert not any(r["id"] == rec.id for b in batches for r in b.rows)
            row = await writer.get(rec.id)
            assert row is not None and (row["bytes"], row["events"], row["last_event_id"]) \
                == (9, 1, "1")
            batches.clear()
            rec.client_gone_at = 12.5
            writer.touch(rec)
            writer.append(rec, b"data: 2\n\n")
            rec.bytes, rec.events = 18, 2
            fail[0] = True  # the first flush fails: its entries go back, still "whole row"
            while writer.failures == 0 or writer.degraded:
                await trio.sleep(0.01)
            rows = [r for b in batches for r in b.rows if r["id"] == rec.id]
            assert len(rows) >= 2  # the failed flush's and the retry's, both whole rows
            row = await writer.get(rec.id)
            assert row is not None and row["client_gone_at"] == 12.5 and row["bytes"] == 18
            # A progress-only flush fails while a touch arrives: the retry writes it whole.
            other = _rec()
            await writer.commit(other)

            def gone() -> None:
                other.client_gone_at = 13.5
                writer.touch(other)

            during = gone
            writer.append(other, b"data: 1\n\n")
            other.bytes, other.events = 9, 1
            fail[0] = True
            failures = writer.failures
            while writer.failures == failures or writer.degraded:
                await trio.sleep(0.01)
            row = await writer.get(other.id)
            assert row is not None and row["client_gone_at"] == 13.5 and row["bytes"] == 9
        nursery.cancel_scope.cancel()
    backend.close()


def _tables(path: Path) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """``(stream_id, offset, length)`` of every row in ``chunks`` and in ``tail``."""
    with sqlite3.connect(path) as conn:
        chunks = conn.execute("SELECT stream_id, offset, length(data) FROM chunks "
                              "ORDER BY stream_id, offset").fetchall()
        tail = conn.execute("SELECT stream_id, offset, length(data) FROM tail "
                            "ORDER BY rowid").fetchall()
    return chunks, tail


def test_sqlite_small_pieces_go_to_the_tail_and_a_fold_moves_them_whole(tmp_path: Path) -> None:
    """Small pieces land in ``tail`` (appended together), a large piece of a stream with
    nothing in ``tail`` goes straight to ``chunks``, and a stream with pieces in ``tail`` keeps
    adding there (one contiguous run). Readers see one body across both tables; a fold moves
    each stream's run into one ``chunks`` row with the run's last progress, and the body and
    progress read back the same."""
    path = tmp_path / "j.db"
    b = SQLiteBackend(str(path))
    b.setup()
    a, c = _rec(), _rec()
    b.commit(Batch(rows=[a.row(), c.row()]))
    big = b"B" * b.tail_piece
    b.commit(Batch(chunks=[(a.id, 0, b"data: 1\n\n", 1, "1"), (c.id, 0, big, 0, None)]))
    b.commit(Batch(chunks=[(a.id, 9, big, 1, "1"), (c.id, len(big), b"cc", 0, None)]))
    b.commit(Batch(chunks=[(c.id, len(big) + 2, big, 0, None)]))
    chunks, tail = _tables(path)
    assert chunks == [(c.id, 0, len(big))]
    assert tail == [(a.id, 0, 9), (a.id, 9, len(big)), (c.id, len(big), 2),
                    (c.id, len(big) + 2, len(big))]
    body_a, body_c = b"data: 1\n\n" + big, big + b"cc" + big
    before = {r["id"]: r for r in b.list_records(None, 10)}
    for rec, body in ((a, body_a), (c, body_c)):
        assert b.read_body(rec.id) == body
        assert b.read_body(rec.id, 5, len(big)) == body[5:5 + len(big)]
        assert b.read_body(rec.id, len(body) - 3) == body[-3:]
        got = b.get(rec.id)
        assert got is not None and got["bytes"] == len(body) == before[rec.id]["bytes"]
    assert (before[a.id]["events"], before[a.id]["last_event_id"]) == (1, "1")
    assert b.wants_fold() is False
    b.fold()
    chunks, tail = _tables(path)
    assert tail == []
    assert sorted(chunks) == sorted([(a.id, 0, len(body_a)), (c.id, 0, len(big)),
                                     (c.id, len(big), 2 + len(big))])
    assert {r["id"]: r for r in b.list_records(None, 10)} == before
    assert b.read_body(a.id) == body_a and b.read_body(c.id) == body_c
    assert b.integrity_check() == []
    # After the fold, a large piece goes straight to ``chunks`` again.
    b.commit(Batch(chunks=[(a.id, len(body_a), big, 2, "2")]))
    assert _tables(path)[1] == []
    b.close()


def test_sqlite_fold_keeps_a_gap_as_two_rows(tmp_path: Path) -> None:
    """A run in ``tail`` broken by a gap (rows left by hand, or another writer's) folds into
    one ``chunks`` row per contiguous run, never a row that spans the gap."""
    path = tmp_path / "j.db"
    b = SQLiteBackend(str(path))
    b.setup()
    r = _rec()
    b.commit(Batch(rows=[r.row()]))
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO tail VALUES (?, ?, ?, ?, ?)",
                         [(r.id, 0, b"ab", 0, None), (r.id, 2, b"cd", 0, None),
                          (r.id, 10, b"ef", 0, None), (r.id, 12, b"g", 0, None)])
    b.fold()
    assert _tables(path) == ([(r.id, 0, 4), (r.id, 10, 3)], [])
    assert b.read_body(r.id) == b"abcdefg"
    b.close()


async def test_writer_folds_the_tail_once_it_is_full(tmp_path: Path) -> None:
    """The flush loop folds ``tail`` into ``chunks`` (in a worker thread) once it holds
    ``fold_rows`` rows; every body and its progress read back whole throughout."""
    backend, writer = await _sqlite_writer(tmp_path, flush_interval_ms=5)
    backend.fold_rows = 6
    recs = [_rec() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        with trio.fail_after(10):
            for rec in recs:
                await writer.commit(rec)
            folded = 0
            for i in range(10):
                for rec in recs:
                    writer.append(rec, b"data: %d\n\n" % i)
                    rec.bytes += 9
                    rec.events += 1
                await writer.commit(recs[0])  # inline: the flush loop is woken for the fold
                while backend.wants_fold():
                    await trio.sleep(0.005)
                chunks, tail = await trio.to_thread.run_sync(_tables, tmp_path / "j.db")
                assert len(tail) < 6
                folded += not tail and bool(chunks)
                for rec in recs:
                    row = await writer.get(rec.id)
                    assert row is not None and (row["bytes"], row["events"]) == \
                        (rec.bytes, rec.events)
                    assert await writer.read_body(rec.id) == \
                        b"".join(b"data: %d\n\n" % k for k in range(i + 1))
            assert folded >= 2
        nursery.cancel_scope.cancel()
    backend.close()


def test_sqlite_recovery_prune_and_close_fold_the_tail(tmp_path: Path) -> None:
    """Rows a killed process left in ``tail``: recovery folds them first, so an orphaned
    record's body is whole in ``chunks`` and its ``bytes`` matches. A prune folds first and
    then deletes a pruned stream's pieces wherever they were; ``close`` folds what this
    process left in ``tail``."""
    path = tmp_path / "j.db"
    b = SQLiteBackend(str(path))
    b.setup()
    dead = _rec("gone-host/1/1/ff")
    b.commit(Batch(rows=[dead.row()]))
    b.commit(Batch(chunks=[(dead.id, 0, b"data: a\n\n", 1, None)]))
    b.commit(Batch(chunks=[(dead.id, 9, b"data: b\n\n", 2, None)]))
    b._w.close()  # type: ignore[union-attr]  # "killed": no close(), no fold
    b._w = None
    assert len(_tables(path)[1]) == 2
    b2 = SQLiteBackend(str(path))
    b2.setup()
    assert b2.wants_fold() is False and b2._tail_rows == 2  # it learnt what tail holds
    assert b2.recover("me") == 1
    assert _tables(path) == ([(dead.id, 0, 18)], [])
    got = b2.get(dead.id)
    assert got is not None and (got["status"], got["bytes"], got["events"]) == ("orphaned", 18, 2)
    live, done = _rec("me"), _rec("me")
    b2.commit(Batch(rows=[live.row(), done.row()]))
    b2.commit(Batch(chunks=[(live.id, 0, b"x", 0, None), (done.id, 0, b"y", 0, None)]))
    done.finish(Status.COMPLETED, None, now=1.0)
    b2.commit(Batch(rows=[{**done.row(), "bytes": 1}], stored=[True]))
    assert b2.prune(time.time()) == 2  # the orphaned record and ``done``
    assert _tables(path) == ([(live.id, 0, 1)], [])
    assert b2.read_body(live.id) == b"x" and b2.get(done.id) is None
    b2.commit(Batch(chunks=[(live.id, 1, b"z", 0, None)]))
    # A reader on the same file (``keepstream streams show`` beside a running server) sees
    # the tail's piece and leaves the journal as it found it when it closes.
    reader = SQLiteBackend(str(path))
    reader.setup()
    assert reader.read_body(live.id) == b"xz"
    reader.close()
    assert _tables(path)[1] == [(live.id, 1, 1)]
    b2.close()
    assert _tables(path) == ([(live.id, 0, 1), (live.id, 1, 1)], [])


async def test_inline_commits_alone_still_get_the_backends_upkeep(tmp_path: Path) -> None:
    """Streams that only ever commit inline (record creations, no appends: nothing else
    wakes the flush loop) still get the WAL checkpointed once it is due."""
    backend, writer = await _sqlite_writer(tmp_path, flush_interval_ms=5)
    backend.checkpoint_bytes = 3 * 4096
    done: list[int] = []
    real = backend.checkpoint

    def checkpoint() -> None:
        done.append(1)
        real()

    backend.checkpoint = checkpoint
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        with trio.fail_after(10):
            for _ in range(4):
                assert writer.commit_now(_rec())  # inline: no flush-loop transaction
            while backend.wants_checkpoint():
                await trio.sleep(0.005)
        assert done
        nursery.cancel_scope.cancel()
    backend.close()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(
    st.one_of(
        st.tuples(st.just("piece"), st.integers(0, 2), st.integers(1, 3000)),
        st.tuples(st.just("fold"), st.just(0), st.just(0)),
        st.tuples(st.just("other"), st.integers(0, 2), st.integers(1, 300)),
    ), min_size=1, max_size=40))
def test_sqlite_bodies_survive_any_mix_of_pieces_folds_and_writers(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, int, int]]
) -> None:
    """Property (I2 through the tail): pieces of any size for several streams, written by this
    backend and by a second one on the same file (another ``--workers`` process), with folds
    from either at any point: every body reads back byte for byte, in order, from either
    backend, with each open record's progress its last piece's; after both close, ``tail``
    is empty and ``integrity_check`` is clean once the streams end."""
    path = tmp_path_factory.mktemp("j") / "j.db"
    mine, theirs = SQLiteBackend(str(path)), SQLiteBackend(str(path))
    mine.setup()
    theirs.setup()
    recs = [_rec(), _rec(), _rec()]
    other = _rec("b")
    mine.commit(Batch(rows=[r.row() for r in recs]))
    theirs.commit(Batch(rows=[other.row()]))
    bodies: dict[str, bytearray] = {r.id: bytearray() for r in [*recs, other]}
    for n, (kind, which, size) in enumerate(steps):
        if kind == "fold":
            (mine if n % 2 else theirs).fold()
            continue
        backend, rec = (mine, recs[which]) if kind == "piece" else (theirs, other)
        data = bytes([65 + n % 26]) * size
        body = bodies[rec.id]
        backend.commit(Batch(chunks=[(rec.id, len(body), data, n, f"e{n}")]))
        body += data
        rec.events, rec.last_event_id = n, f"e{n}"
    for reader in (mine, theirs):
        for rec in [*recs, other]:
            assert reader.read_body(rec.id) == bodies[rec.id]
            got = reader.get(rec.id)
            assert got is not None and got["bytes"] == len(bodies[rec.id])
            if bodies[rec.id]:
                assert (got["events"], got["last_event_id"]) == (rec.events, rec.last_event_id)
    for backend, rec in [(mine, r) for r in recs] + [(theirs, other)]:
        rec.finish(Status.COMPLETED, None)
        backend.commit(Batch(rows=[{**rec.row(), "bytes": len(bodies[rec.id])}], stored=[True]))
    mine.close()
    theirs.close()
    assert _tables(path)[1] == []
    check = SQLiteBackend(str(path))
    check.setup()
    assert check.integrity_check() == []
    assert all(check.read_body(r.id) == bodies[r.id] for r in [*recs, other])
    check.close()
