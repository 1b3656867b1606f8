"""Journal backends and the writer task.

Design:

* A *backend* is synchronous and small (``setup``, ``recover``, ``commit``, ``get``, ``list``,
  ``read_body``, ``close``). The SQLite backend runs in worker threads via
  ``trio.to_thread.run_sync``: one writer connection, one reader connection, each behind its own
  ``CapacityLimiter(1)``. A call in a thread cannot be cancelled, so the database carries its own
  limits (``busy_timeout``). Small transactions are tried on the event loop first
  (``try_commit_inline``: no lock wait, no disk sync), since the thread round trip costs more
  than they do; a locked database sends them to the thread.
* The :class:`JournalWriter` is the only task that writes. Streams hand it bytes with
  :meth:`JournalWriter.append` (no await, O(1)); it commits one transaction per flush, at most
  every ``flush_interval_ms`` or as soon as ``flush_bytes`` are pending. A record's creation and
  its terminal status are *urgent*: :meth:`JournalWriter.commit` flushes at once and waits for
  the transaction, so the terminal status and the last bytes land together (I1, I2).
* The loss bound on SIGKILL is therefore what was appended but not yet committed: at most
  ``flush_interval_ms`` of traffic, and at most ``flush_bytes`` per flush (docs/operations.md).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Protocol

import outcome
import trio

from ._config import JournalConfig, journal_kind
from ._errors import JournalError
from ._record import Record, owner_alive

log = logging.getLogger("keepstream")

_COLUMNS = (
    "id", "instance", "route", "method", "path", "status", "reason", "upstream_status",
    "created_at", "first_byte_at", "ended_at", "client_gone_at", "bytes", "events", "detached",
    "last_event_id", "owner",
)


#: A piece of body: ``(id, offset, data, events, last_event_id)``, the last two being the
#: stream's progress once ``data`` is in (``PROGRESS_COLUMNS`` with ``bytes`` = offset + len).
Chunk = tuple[str, int, bytes, int, "str | None"]


@dataclass(slots=True)
class Batch:
    """One transaction: record rows to upsert and body bytes to append.

    A stream whose only change since its row was stored is its progress has no row here: its
    chunk carries the progress (``Chunk``), and a backend that stores bodies keeps it there
    (SQLite: in the chunk row, read back by ``get``, ``list_records`` and ``recover``), so a
    paced stream's flush writes one row, not two."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    #: Per row (when given): True if an earlier transaction of this process stored it, so a
    #: backend may update its changing columns instead of upserting the whole row.
    stored: list[bool] = field(default_factory=list)


class Backend(Protocol):
    threaded: bool
    stores_bodies: bool
    #: Largest batch (body bytes) :meth:`try_commit_inline` takes; 0: the backend has none.
    inline_bytes: int

    def setup(self) -> None: ...
    def recover(self, instance: str) -> int: ...
    def commit(self, batch: Batch) -> None: ...
    def try_commit_inline(self, batch: Batch) -> bool: ...
    def wants_checkpoint(self) -> bool: ...
    def checkpoint(self) -> None: ...
    def wants_fold(self) -> bool: ...
    def fold(self) -> None: ...
    def get(self, stream_id: str) -> dict[str, Any] | None: ...
    def list_records(self, status: str | None, limit: int) -> list[dict[str, Any]]: ...
    def read_body(self, stream_id: str, offset: int = 0, limit: int | None = None) -> bytes: ...
    def integrity_check(self) -> list[str]: ...
    def prune(self, before: float) -> int: ...
    def close(self) -> None: ...


class MemoryBackend:
    """Everything in dicts, for tests and ``memory:``. Lost when the process ends."""

    threaded = False
    stores_bodies = True

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.bodies: dict[str, bytearray] = {}

    def setup(self) -> None:
        pass

    def recover(self, instance: str) -> int:
        n = 0
        for row in self.rows.values():
            if row["status"] == "open" and row["instance"] != instance and \
                    not owner_alive(row["instance"]):
                row.update(status="orphaned", reason="found open at start-up",
                           ended_at=time.time())
                n += 1
        return n

    def commit(self, batch: Batch) -> None:
        for sid, offset, data, _, _ in batch.chunks:
            body = self.bodies.setdefault(sid, bytearray())
            if offset != len(body):
                raise JournalError(f"non-contiguous append to {sid}: {offset} != {len(body)}")
            body += data
        self._progress(batch)
        for row in batch.rows:
            self.rows[row["id"]] = dict(row)

    def _progress(self, batch: Batch) -> None:
        """Each chunk's progress into its row (a row gone since waits for its next whole
        write: the stream's end at the latest)."""
        for sid, offset, data, events, last_id in batch.chunks:
            row = self.rows.get(sid)
            if row is not None:
                row.update(bytes=offset + len(data), events=events, last_event_id=last_id)

    #: No inline commits: the memory journal keeps the flush loop's path (the one SQLite takes
    #: when its database is locked), which the row-20 interleaving model explores.
    inline_bytes = 0

    def try_commit_inline(self, batch: Batch) -> bool:
        self.commit(batch)
        return True

    def wants_checkpoint(self) -> bool:
        return False

    def checkpoint(self) -> None:
        return None

    def wants_fold(self) -> bool:
        return False

    def fold(self) -> None:
        return None

    def get(self, stream_id: str) -> dict[str, Any] | None:
        row = self.rows.get(stream_id)
        return dict(row) if row is not None else None

    def list_records(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        rows = [r for r in self.rows.values() if status is None or r["status"] == status]
        rows.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
        return [dict(r) for r in rows[:limit]]

    def read_body(self, stream_id: str, offset: int = 0, limit: int | None = None) -> bytes:
        body = self.bodies.get(stream_id, bytearray())
        end = len(body) if limit is None else offset + limit
        return bytes(body[offset:end])

    def integrity_check(self) -> list[str]:
        return []

    def prune(self, before: float) -> int:
        gone = [k for k, r in self.rows.items()
                if r["status"] != "open" and (r["ended_at"] or 0) < before]
        for k in gone:
            del self.rows[k]
            self.bodies.pop(k, None)
        return len(gone)

    def close(self) -> None:
        pass


class NoneBackend(MemoryBackend):
    """``none``: no journal. Records are kept in memory only while their stream runs."""

    stores_bodies = False

    def commit(self, batch: Batch) -> None:
        self._progress(batch)
        for row in batch.rows:
            if row["status"] == "open":
                self.rows[row["id"]] = dict(row)
            else:
                self.rows.pop(row["id"], None)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    id TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    route TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    upstream_status INTEGER,
    created_at REAL NOT NULL,
    first_byte_at REAL,
    ended_at REAL,
    client_gone_at REAL,
    bytes INTEGER NOT NULL DEFAULT 0,
    events INTEGER NOT NULL DEFAULT 0,
    detached INTEGER NOT NULL DEFAULT 0,
    last_event_id TEXT,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS streams_status ON streams (status);
CREATE INDEX IF NOT EXISTS streams_created ON streams (created_at);
CREATE TABLE IF NOT EXISTS chunks (
    stream_id TEXT NOT NULL,
    offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    events INTEGER,
    last_event_id TEXT,
    PRIMARY KEY (stream_id, offset)
);
CREATE TABLE IF NOT EXISTS tail (
    stream_id TEXT NOT NULL,
    offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    events INTEGER,
    last_event_id TEXT
);
"""

#: The columns that change after a record's creation (the rest are written once).
_MUTABLE = (
    "status", "reason", "upstream_status", "first_byte_at", "ended_at", "client_gone_at",
    "bytes", "events", "detached", "last_event_id", "owner",
)

# A row known to exist takes this UPDATE: an upsert costs about three times as much in SQLite
# (the failed insert, then every column and both indexes rewritten), and a busy journal
# rewrites every open stream's row on each flush.
_UPDATE = f"UPDATE streams SET {', '.join(f'{c} = ?' for c in _MUTABLE)} WHERE id = ?"
#: A row's parameters for ``_UPDATE`` and ``_UPSERT``, taken in C (a generator over the
#: columns cost a Python step per column).
_UPDATE_ARGS = itemgetter(*_MUTABLE, "id")
_UPSERT_ARGS = itemgetter(*_COLUMNS)

#: What a flush changes in an open stream's row when nothing else happened to it: its progress.
#: The SQLite journal keeps it in the flush's chunk row (``chunks.events``,
#: ``chunks.last_event_id``; ``bytes`` is the chunk's end), not in ``streams``: an open row's
#: progress columns are as of its last whole write, and readers take the newer figures from
#: its last chunk (``_LAST_CHUNK``). Updating 200 open rows on every flush of a paced load was
#: half of the journal's cost (benchmarks/journal_floor.py).
PROGRESS_COLUMNS = ("bytes", "events", "last_event_id")
_INSERT_CHUNK = ("INSERT INTO chunks (stream_id, offset, data, events, last_event_id) "
                 "VALUES (?, ?, ?, ?, ?)")
_INSERT_TAIL = ("INSERT INTO tail (stream_id, offset, data, events, last_event_id) "
                "VALUES (?, ?, ?, ?, ?)")
#: An open stream's progress as of its last chunk: ``(end, events, last_event_id)``; ``events``
#: is NULL in a chunk written before the progress moved there (its row has the progress).
_LAST_CHUNK = ("SELECT offset + length(data), events, last_event_id FROM chunks "
               "WHERE stream_id = ? ORDER BY offset DESC LIMIT 1")
_LAST_TAIL = ("SELECT offset + length(data), events, last_event_id FROM tail "
              "WHERE stream_id = ? ORDER BY offset DESC LIMIT 1")
#: A body's pieces from both tables, in order (``tail`` holds the recent small ones).
_BODY = ("SELECT offset, data FROM chunks WHERE stream_id = ?1 AND offset + length(data) > ?2 "
         "UNION ALL SELECT offset, data FROM tail WHERE stream_id = ?1 "
         "AND offset + length(data) > ?2 ORDER BY offset")

_UPSERT = (
    f"INSERT INTO streams ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
    "ON CONFLICT(id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c != "id")
)


class SQLiteBackend:
    """SQLite in WAL mode with ``synchronous=NORMAL``: a committed transaction survives a
    process crash (SIGKILL); only power loss can take the last commits."""

    threaded = True
    stores_bodies = True
    #: Batches up to this many body bytes commit on the event loop (try_commit_inline).
    inline_bytes = 64 * 1024
    #: WAL bytes written between checkpoints (SQLite's own default is 1,000 pages).
    checkpoint_bytes = 4 * 1024 * 1024
    #: A piece of body smaller than this goes to ``tail`` (see ``_write``).
    tail_piece = 2048
    #: ``tail`` is folded into ``chunks`` once it holds this many rows or bytes.
    fold_rows = 4096
    fold_bytes = 1024 * 1024

    def __init__(self, path: str, *, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self._busy_ms = busy_timeout_ms
        self._w: sqlite3.Connection | None = None
        self._r: sqlite3.Connection | None = None
        self._since_checkpoint = 0
        self._w_busy_ms = busy_timeout_ms  # the writer connection's busy_timeout now
        self._tail_rows = 0  # rows and bytes in ``tail`` (as far as this process knows)
        self._tail_bytes = 0
        self._in_tail: set[str] = set()  # streams with rows in ``tail``
        self._wrote_tail = False  # this process put rows in ``tail`` since its last fold

    def _wait_for_lock(self, ms: int) -> None:
        """Set the writer connection's ``busy_timeout`` (only when it changes): 0 for inline
        commits on the event loop, the configured wait for everything run in a thread. Inline
        commits in a row then cost no PRAGMA at all."""
        if self._w_busy_ms != ms:
            self._writer.execute(f"PRAGMA busy_timeout = {ms}")
            self._w_busy_ms = ms

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=self._busy_ms / 1000)
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_ms)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open SQLite journal {self.path!r}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        return conn

    def setup(self) -> None:
        self._w = self._connect()
        self._w_busy_ms = int(self._busy_ms)
        # Checkpoints are the writer's own, in a worker thread (wants_checkpoint/checkpoint):
        # SQLite's automatic one would run, and sync the disk, inside whichever commit crosses
        # the threshold, an inline one on the event loop included.
        try:
            self._w.execute("PRAGMA wal_autocheckpoint = 0")
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open SQLite journal {self.path!r}: {exc}") from exc
        try:
            self._w.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot create the journal schema: {exc}") from exc
        cols = {r[1] for r in self._w.execute("PRAGMA table_info(streams)").fetchall()}
        if "owner" not in cols:  # journals written by keepstream 0.1 before resume existed
            self._w.execute("ALTER TABLE streams ADD COLUMN owner TEXT")
        cols = {r[1] for r in self._w.execute("PRAGMA table_info(chunks)").fetchall()}
        if "events" not in cols:  # journals written before the progress moved to the chunks
            self._w.execute("ALTER TABLE chunks ADD COLUMN events INTEGER")
            self._w.execute("ALTER TABLE chunks ADD COLUMN last_event_id TEXT")
        self._note_tail()
        self._r = self._connect()

    def _note_tail(self) -> None:
        """Learn what ``tail`` holds (rows another process, or one killed, left there)."""
        rows, nbytes = self._writer.execute(
            "SELECT count(*), coalesce(sum(length(data)), 0) FROM tail").fetchone()
        self._tail_rows, self._tail_bytes = int(rows), int(nbytes)
        self._in_tail = {r[0] for r in self._writer.execute("SELECT DISTINCT stream_id FROM tail")}

    @property
    def _writer(self) -> sqlite3.Connection:
        if self._w is None:
            raise JournalError("journal is not open")
        return self._w

    @property
    def _reader(self) -> sqlite3.Connection:
        if self._r is None:
            raise JournalError("journal is not open")
        return self._r

    def recover(self, instance: str) -> int:
        """Mark ``orphaned`` the records left ``open`` by instances that are gone (a live
        sibling's records, ``--workers`` or a second process on this journal, are kept)."""
        try:
            self._wait_for_lock(int(self._busy_ms))
            self.fold()  # every body whole in ``chunks`` first
            owners = [r[0] for r in self._writer.execute(
                "SELECT DISTINCT instance FROM streams WHERE status = 'open' AND instance != ?",
                (instance,),
            )]
        except sqlite3.Error as exc:
            raise JournalError(f"recovery failed: {exc}") from exc

        def orphan(conn: sqlite3.Connection, owner: str) -> int:
            # The progress of its last durable piece first (an open row's own is as of its
            # last whole write), so ``bytes`` matches the committed body.
            for (sid,) in conn.execute(
                    "SELECT id FROM streams WHERE status = 'open' AND instance = ?", (owner,)
            ).fetchall():
                self._settle_progress(conn, sid)
            return int(conn.execute(
                "UPDATE streams SET status = 'orphaned', reason = 'found open at start-up', "
                "ended_at = ? WHERE status = 'open' AND instance = ?", (time.time(), owner),
            ).rowcount)

        return sum(self._transact("recovery", orphan, owner)
                   for owner in owners if not owner_alive(owner))

    def _transact(self, what: str, work: Any, *args: Any) -> Any:
        """``work(conn, *args)`` in one transaction of the writer connection (rolled back if
        it raises); a database error becomes ``JournalError`` naming ``what``."""
        conn = self._writer
        try:
            self._wait_for_lock(int(self._busy_ms))
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn, *args)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise JournalError(f"{what} failed: {exc}") from exc
        return result

    @staticmethod
    def _settle_progress(conn: sqlite3.Connection, sid: str) -> None:
        """Write the progress of ``sid``'s last chunk into its row (in the caller's
        transaction)."""
        last = conn.execute(_LAST_CHUNK, (sid,)).fetchone()
        if last is None:
            return
        end, events, last_id = last
        if events is None:  # an older chunk: the row holds its progress; bytes to be sure
            conn.execute("UPDATE streams SET bytes = ? WHERE id = ? AND bytes < ?",
                         (end, sid, end))
        else:
            conn.execute("UPDATE streams SET bytes = ?, events = ?, last_event_id = ? "
                         "WHERE id = ? AND bytes < ?", (end, events, last_id, sid, end))

    @staticmethod
    def _with_progress(conn: sqlite3.Connection, row: sqlite3.Row,
                       tails: dict[str, tuple[int, int | None, str | None]] | None = None,
                       ) -> dict[str, Any]:
        """``row`` as a dict, an open one with the progress of its last piece (in ``tail``,
        else in ``chunks``) when newer. ``tails``: every stream's last piece in ``tail``,
        read once for many rows (``list_records``)."""
        out = dict(row)
        if out["status"] == "open":
            sid = out["id"]
            last: Any = tails.get(sid) if tails is not None else \
                conn.execute(_LAST_TAIL, (sid,)).fetchone()
            if last is None:
                last = conn.execute(_LAST_CHUNK, (sid,)).fetchone()
            if last is not None and last[0] > out["bytes"]:
                out["bytes"] = last[0]
                if last[1] is not None:
                    out["events"], out["last_event_id"] = last[1], last[2]
        return out

    def commit(self, batch: Batch) -> None:
        conn = self._writer
        try:
            self._wait_for_lock(int(self._busy_ms))
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise JournalError(f"journal write failed: {exc}") from exc
        self._write(conn, batch)

    def try_commit_inline(self, batch: Batch) -> bool:
        """:meth:`commit` without waiting for the database lock, for the event loop's own
        thread: False (nothing written) when another connection holds the lock; the caller
        then commits in a worker thread, where waiting (``busy_timeout``) is harmless. With
        ``wal_autocheckpoint`` off, a WAL commit under ``synchronous=NORMAL`` writes to the
        page cache and never syncs, so it does not wait for the disk either."""
        conn = self._writer
        try:
            self._wait_for_lock(0)
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return False
            raise JournalError(f"journal write failed: {exc}") from exc
        except sqlite3.Error as exc:
            raise JournalError(f"journal write failed: {exc}") from exc
        self._write(conn, batch)
        return True

    def wants_checkpoint(self) -> bool:
        return self._since_checkpoint >= self.checkpoint_bytes

    def wants_fold(self) -> bool:
        return self._tail_rows >= self.fold_rows or self._tail_bytes >= self.fold_bytes

    def fold(self) -> None:
        """Move every piece in ``tail`` into ``chunks``, one row per stream (per contiguous
        run), in one transaction. Run in a worker thread (``JournalWriter``), at start-up
        (``recover``), before a prune and at ``close``."""
        self._since_checkpoint += self._transact("journal fold", self._fold)
        self._tail_rows = self._tail_bytes = 0
        self._in_tail = set()
        self._wrote_tail = False

    @staticmethod
    def _fold(conn: sqlite3.Connection) -> int:
        """:meth:`fold`'s work in the caller's transaction; returns its WAL estimate."""
        runs: dict[str, list[Any]] = {}  # stream -> [offset, end, pieces, events, last id]
        done: list[tuple[str, list[Any]]] = []
        moved = 0
        cur = conn.cursor()
        cur.row_factory = None  # plain tuples: a sqlite3.Row per row costs more
        for sid, offset, data, events, last_id in cur.execute(
                "SELECT stream_id, offset, data, events, last_event_id FROM tail "
                "ORDER BY rowid"):
            moved += len(data)
            run = runs.get(sid)
            if run is not None and run[1] == offset:
                run[1] += len(data)
                run[2].append(data)
                run[3], run[4] = events, last_id
            else:  # (a stream's tail rows are contiguous; a gap only starts a new row)
                if run is not None:
                    done.append((sid, run))
                runs[sid] = [offset, offset + len(data), [data], events, last_id]
        done.extend(runs.items())
        if not done:
            return 0
        conn.executemany(_INSERT_CHUNK, [
            (sid, r[0], r[2][0] if len(r[2]) == 1 else b"".join(r[2]), r[3], r[4])
            for sid, r in done])
        conn.execute("DELETE FROM tail")
        return 2 * moved + 4096 * len(done)

    def checkpoint(self) -> None:
        """Copy the WAL back into the database (``PASSIVE``: never waits for readers or
        writers). Run in a worker thread: it syncs the disk."""
        self._since_checkpoint = 0
        try:
            self._writer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            raise JournalError(f"journal checkpoint failed: {exc}") from exc

    def _write(self, conn: sqlite3.Connection, batch: Batch) -> None:
        """The rest of a transaction begun on ``conn``: write ``batch``, commit."""
        try:
            try:
                tail: list[Chunk] = []
                direct: list[Chunk] = []
                tail_bytes = 0
                if batch.chunks:
                    # A small piece goes to ``tail``, where each flush's rows are appended
                    # together (a few pages); in ``chunks`` each stream's row lands on its
                    # own page of the (stream_id, offset) index: 200 paced streams dirtied
                    # about 200 pages per flush. A stream with rows in ``tail`` keeps its
                    # pieces there until the fold, so they stay one contiguous run.
                    piece, in_tail = self.tail_piece, self._in_tail
                    for c in batch.chunks:
                        if len(c[2]) < piece or c[0] in in_tail:
                            tail.append(c)
                            tail_bytes += len(c[2])
                        else:
                            direct.append(c)
                    if tail:
                        conn.executemany(_INSERT_TAIL, tail)
                    if direct:
                        conn.executemany(_INSERT_CHUNK, direct)
                if batch.rows:
                    self._write_rows(conn, batch)
                conn.execute("COMMIT")
                if tail:
                    self._tail_rows += len(tail)
                    self._tail_bytes += tail_bytes
                    self._in_tail.update(c[0] for c in tail)
                    self._wrote_tail = True
                # What the WAL grew by, about: the body bytes, a page for the tail's rows, a
                # page per row and per direct chunk row.
                self._since_checkpoint += tail_bytes + 4096 * (
                    1 + len(batch.rows) + len(direct)) + sum(len(c[2]) for c in direct)
            except BaseException:
                # A failed COMMIT (disk full, busy) leaves the transaction open: roll it back,
                # or every later BEGIN fails and the journal never recovers.
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise
        except sqlite3.Error as exc:
            raise JournalError(f"journal write failed: {exc}") from exc

    @staticmethod
    def _write_rows(conn: sqlite3.Connection, batch: Batch) -> None:
        stored = batch.stored
        fresh: list[dict[str, Any]] = []
        known: list[dict[str, Any]] = []
        for i, row in enumerate(batch.rows):
            (known if i < len(stored) and stored[i] else fresh).append(row)
        if known:
            cur = conn.executemany(_UPDATE, [_UPDATE_ARGS(row) for row in known])
            if cur.rowcount != len(known):
                # A row gone since (pruned, or deleted by hand): write those rows whole.
                fresh += known
        if fresh:
            conn.executemany(_UPSERT, [_UPSERT_ARGS(row) for row in fresh])

    def get(self, stream_id: str) -> dict[str, Any] | None:
        conn = self._reader
        try:
            # One read transaction, so the row and its last chunk are of the same commit.
            conn.execute("BEGIN")
            try:
                row = conn.execute("SELECT * FROM streams WHERE id = ?", (stream_id,)).fetchone()
                return self._with_progress(conn, row) if row is not None else None
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed: {exc}") from exc

    def list_records(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        sql = "SELECT * FROM streams"
        args: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            args = (status,)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        conn = self._reader
        try:
            conn.execute("BEGIN")
            try:
                rows = conn.execute(sql, (*args, limit)).fetchall()
                tails: dict[str, tuple[int, int | None, str | None]] = {}
                if any(r["status"] == "open" for r in rows):
                    for sid, end, events, last_id in conn.execute(
                            "SELECT stream_id, offset + length(data), events, last_event_id "
                            "FROM tail ORDER BY rowid"):
                        tails[sid] = (end, events, last_id)  # the last one wins
                return [self._with_progress(conn, r, tails) for r in rows]
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed: {exc}") from exc

    def read_body(self, stream_id: str, offset: int = 0, limit: int | None = None) -> bytes:
        try:
            rows = self._reader.execute(_BODY, (stream_id, offset)).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed: {exc}") from exc
        out = bytearray()
        for start, data in rows:
            out += data[max(0, offset - start):]
            if limit is not None and len(out) >= limit:
                break
        return bytes(out if limit is None else out[:limit])

    def integrity_check(self) -> list[str]:
        rows = self._reader.execute("PRAGMA integrity_check").fetchall()
        problems = [r[0] for r in rows if r[0] != "ok"]
        bad = self._reader.execute(
            "SELECT s.id FROM streams s LEFT JOIN (SELECT stream_id, SUM(n) n FROM ("
            "SELECT stream_id, length(data) n FROM chunks UNION ALL "
            "SELECT stream_id, length(data) FROM tail) GROUP BY stream_id) c "
            "ON c.stream_id = s.id "
            # An open row's progress is as of its last whole write: at most its chunks.
            "WHERE s.bytes != COALESCE(c.n, 0) AND (s.status != 'open' OR s.bytes > "
            "COALESCE(c.n, 0))"
        ).fetchall()
        problems += [f"stream {r[0]}: bytes column does not match its chunks" for r in bad]

        return problems

    def prune(self, before: float) -> int:
        """Delete terminal records that ended before ``before`` (epoch s), with their bodies
        (``tail`` folded first, so a body is all in ``chunks``)."""
        self.fold()

        def delete(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM chunks WHERE stream_id IN (SELECT id FROM streams WHERE "
                         "status != 'open' AND ended_at < ?)", (before,))
            return int(conn.execute("DELETE FROM streams WHERE status != 'open' AND "
                                    "ended_at < ?", (before,)).rowcount)

        n: int = self._transact("prune", delete)
        return n

    def close(self) -> None:
        if self._w is not None and self._wrote_tail:
            # Leave the journal at rest with every body in ``chunks`` (readers, and
            # recovery, handle ``tail`` rows too: this is tidiness, not safety). Only what
            # this process wrote: a reader (``keepstream streams show``) never writes.
            try:
                self.fold()
            except JournalError as exc:
                log.warning("keepstream: %s", exc)
        for conn in (self._w, self._r):
            if conn is not None:
                conn.close()
        self._w = self._r = None


def open_backend(url: str) -> Backend:
    """A backend for a journal URL (not yet set up)."""
    kind = journal_kind(url)
    if kind == "memory":
        return MemoryBackend()
    if kind == "none":
        return NoneBackend()
    return SQLiteBackend(url[len("sqlite:///"):])


class _Pending:
    __slots__ = ("chunks", "full", "prev", "record")

    def __init__(self, record: Record, full: bool) -> None:
        self.record = record
        self.chunks: list[bytes] = []
        self.prev = 0  # committed length before this batch (to roll back on failure)
        #: A field besides the progress (``PROGRESS_COLUMNS``) changed: write the whole row.
        self.full = full


#: ``commit_soon``: an inline commit that ended less than this long ago (seconds) means more
#: are coming in the same scheduler pass (a burst of streams ending): group the next ones.
#: Far under the gap between one short stream's two commits (its upstream's round trip).
GROUP_WITHIN = 0.0002


def _uncancellable(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


class JournalWriter:
    """The single writer task of a journal; see the module docstring."""

    def __init__(self, backend: Backend, config: JournalConfig) -> None:
        self.backend = backend
        self._interval = config.flush_interval_ms / 1000
        self._retention = config.retention
        self._flush_bytes = config.flush_bytes
        self._pending: dict[str, _Pending] = {}
        self._pending_bytes = 0
        self._dirty = False
        self._urgent = False
        self._wakeup = trio.Event()  # something is dirty: the flush loop starts its interval
        self._hurry = trio.Event()  # something is urgent: the interval ends now
        self._committed_event = trio.Event()
        self._commits = 0
        self._w_limiter = trio.CapacityLimiter(1)
        self._r_limiter = trio.CapacityLimiter(1)
        self._flushing = False
        self._inline_refused = False  # an inline try failed; none until a commit lands
        #: Many commits at once (a drain cutting its streams): each waits for the flush loop,
        #: whose one transaction takes every stream that ended in the same scheduler pass,
        #: rather than one inline transaction per stream.
        self.grouped = False
        #: commit_soon: the tasks waiting for the first one's transaction in this pass
        self._group: list[trio.lowlevel.Task] | None = None
        self.grouped_commits = 0  # commits that rode on another stream's transaction
        self._last_inline = 0.0  # perf_counter() when the last inline commit ended
        self._inflight_bytes = 0
        self._max_backlog = 4 * config.flush_bytes
        self._retry_delay = 0.0
        self._room: trio.Event | None = None
        self.failures = 0
        self.last_error: str | None = None

    # -- called by streams (no await) -----------------------------------------------------

    def _entry(self, record: Record) -> _Pending:
        """``record``'s pending entry, marked to write the whole row."""
        entry = self._pending.get(record.id)
        if entry is None:
            entry = self._pending[record.id] = _Pending(record, True)
        else:
            entry.full = True
        return entry

    def touch(self, record: Record) -> None:
        """The record's fields changed; write its row with the next flush. (Every change but
        the progress that ``append`` brings must be followed by this, or a ``commit``: a row
        is otherwise written with its progress columns only.)"""
        self._entry(record)
        if not self._dirty:
            self._dirty = True
            self._wakeup.set()

    def append(self, record: Record, data: bytes) -> None:
        """Queue body bytes of ``record`` for the next flush (with its progress: ``bytes``,
        ``events``, ``last_event_id``)."""
        entry = self._pending.get(record.id)
        if entry is None:
            entry = self._pending[record.id] = _Pending(record, False)
        entry.chunks.append(data)
        self._pending_bytes += len(data)
        if not self._dirty:
            self._dirty = True
            self._wakeup.set()
        if self._pending_bytes >= self._flush_bytes and not self._urgent:
            self._hurry_up()

    @property
    def degraded(self) -> bool:
        """True while the last journal transaction failed (until one succeeds again)."""
        return self.last_error is not None

    @property
    def backlog(self) -> int:
        """Body bytes handed to the writer and not yet durable."""
        return self._pending_bytes + self._inflight_bytes

    def over_backlog(self) -> bool:
        return self._pending_bytes + self._inflight_bytes > self._max_backlog

    async def wait_room(self) -> None:
        """Wait until the backlog is under ``4 * flush_bytes`` again.

        Streams call this after appending: when the journal falls behind, the upstream reads
        slow down (TCP backpressure to the upstream), so memory stays bounded while the journal
        still keeps pace with the upstream rather than with any client.
        """
        while self.over_backlog():
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()

    def commit_now(self, record: Record) -> bool:
        """:meth:`commit` if it can be done at once: flush everything pending, ``record``'s
        row included, in one inline transaction on the event loop. True when it is durable
        on return; False when it must go :meth:`commit`'s way (which can wait, so its caller
        arms a timeout only then)."""
        self._entry(record)
        return self._inline_possible() and self._flush_now()

    def _inline_possible(self) -> bool:
        # The inline try only when it can succeed: not while the writer connection is busy in
        # a thread (a checkpoint's disk sync, a prune) or after a try the database refused,
        # until a commit lands. Each failed try gathers and puts back everything pending, so
        # retrying it for every stream that ends meanwhile was quadratic (a drain of 1,000
        # streams during a slow checkpoint built half a million rows).
        inline = self.backend.inline_bytes
        return bool(inline) and not self._flushing and not self._inline_refused and \
            not self.grouped and self._pending_bytes <= inline and \
            not self._w_limiter.borrowed_tokens

    async def commit_soon(self, record: Record) -> bool:
        """:meth:`commit_now`, shared in a burst (streams starting or ending together): when
        an inline commit ended less than ``GROUP_WITHIN`` ago, this one yields once, then
        commits inline, in one transaction, every row asked for meanwhile; the others that ask
        before then wait for that transaction (a wait that cannot be cancelled and lasts one
        pass). True when ``record`` is durable on return; False when it must go
        :meth:`commit`'s way."""
        self._entry(record)
        group = self._group
        if group is not None:
            group.append(trio.lowlevel.current_task())
            done: bool = await trio.lowlevel.wait_task_rescheduled(_uncancellable)
            return done
        if not self._inline_possible():
            return False
        if time.perf_counter() - self._last_inline > GROUP_WITHIN:
            # No commit just went by: most likely no one will join, and the yield costs a
            # scheduler pass, or worse, when the tasks scheduled next are this stream's own
            # (its relay runs twice: 8% more instructions per short stream in
            # benchmarks/instructions.py, where this yielded whenever another task was
            # scheduled).
            return self._flush_now()
        group = self._group = []
        done = False
        try:
            await trio.lowlevel.cancel_shielded_checkpoint()
            done = self._inline_possible() and self._flush_now()
        finally:
            # Whatever happened, the waiters are told (False: they go commit()'s way).
            self._group = None
            self.grouped_commits += len(group) if done else 0
            for task in group:
                trio.lowlevel.reschedule(task, outcome.Value(done))
        return done

    async def commit(self, record: Record) -> None:
        """Flush now, including ``record``'s row, and wait until that transaction is durable."""
        if self.commit_now(record):
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        self._dirty = True
        # A flush already in flight was taken before this call: wait for the one after it.
        target = self._commits + (2 if self._flushing else 1)
        self._hurry_up()
        while self._commits < target:
            await self._committed_event.wait()

    # -- reads ----------------------------------------------------------------------------

    async def _call(self, limiter: trio.CapacityLimiter, fn: Any, *args: Any) -> Any:
        if not self.backend.threaded:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args, limiter=limiter)

    async def get(self, stream_id: str) -> dict[str, Any] | None:
        row: dict[str, Any] | None = await self._call(self._r_limiter, self.backend.get, stream_id)
        return row

    async def list_records(
        self, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self._call(
            self._r_limiter, self.backend.list_records, status, limit
        )
        return rows

    async def read_body(self, stream_id: str, offset: int = 0, limit: int | None = None) -> bytes:
        data: bytes = await self._call(
            self._r_limiter, self.backend.read_body, stream_id, offset, limit
        )
        return data

    # -- the task -------------------------------------------------------------------------

    async def setup(self, instance: str, *, recover: bool = True) -> int:
        """Open the backend and orphan records left open by other (dead) instances."""
        await self._call(self._w_limiter, self.backend.setup)
        if not recover:
            return 0
        orphaned: int = await self._call(self._w_limiter, self.backend.recover, instance)
        return orphaned

    async def prune(self, older_than: float) -> int:
        """Delete terminal records (and bodies) that ended more than ``older_than`` s ago."""
        n: int = await self._call(self._w_limiter, self.backend.prune, time.time() - older_than)
        return n

    async def _retention_loop(self) -> None:
        period = min(3600.0, max(1.0, self._retention / 10))
        while True:
            try:
                await self.prune(self._retention)
            except JournalError as exc:
                self.last_error = str(exc)
            await trio.sleep(period)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush loop (and, with ``journal.retention``, the periodic prune). Cancel it to stop:
        the final flush runs shielded, bounded by 5 s."""
        if self._retention > 0:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._retention_loop)
                await self._flush_loop(task_status)
        else:
            await self._flush_loop(task_status)

    async def _flush_loop(self, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                if not self._urgent:
                    # Only an urgent need (flush_bytes reached, a commit() waiting) ends the
                    # interval early. A row dirtied meanwhile waits for it like the first
                    # one: before, a touch right after an inline commit (which leaves nothing
                    # dirty) ended it, one more transaction for every short stream.
                    self._hurry = trio.Event()
                    with trio.move_on_after(self._interval):
                        await self._hurry.wait()
                await self._flush()
        finally:
            with trio.move_on_after(5.0, shield=True):
                await self._flush(maintain=False)  # (the backend's close() folds)

    def _hurry_up(self) -> None:
        self._urgent = True
        self._wakeup.set()
        self._hurry.set()

    def _take_batch(self) -> tuple[Batch, list[_Pending]]:
        batch = Batch()
        entries = list(self._pending.values())
        self._pending = {}
        self._pending_bytes = 0
        self._dirty = False
        self._urgent = False
        chunks = batch.chunks
        for entry in entries:
            rec = entry.record
            offset = entry.prev = rec.journaled
            if entry.chunks:
                data = entry.chunks[0] if len(entry.chunks) == 1 else b"".join(entry.chunks)
                chunks.append((rec.id, offset, data, rec.events, rec.last_event_id))
                offset += len(data)
            # A row stored already whose only change is progress is not written: its chunk
            # carries the progress (``Batch``).
            if entry.full or not rec.stored:
                row = rec.row()
                row["bytes"] = offset
                batch.rows.append(row)
                batch.stored.append(rec.stored)
            rec.journaled = offset
        return batch, entries

    async def _flush(self, *, maintain: bool = True) -> None:
        if not self._pending:
            self._signal_commit()
        elif not await self._flush_pending():
            return
        if maintain and self.backend.threaded:
            await self._maintain()

    async def _maintain(self) -> None:
        """The backend's own upkeep, in a worker thread, after a flush: fold its tail, then
        checkpoint its WAL, when due. A failure is logged and tried again later."""
        backend = self.backend
        for due, work in ((backend.wants_fold, backend.fold),
                          (backend.wants_checkpoint, backend.checkpoint)):
            if due():
                try:
                    await self._call(self._w_limiter, work)
                except JournalError as exc:
                    log.warning("keepstream: %s", exc)  # retried after the next commits

    def _maintenance_due(self) -> bool:
        backend = self.backend
        return backend.threaded and (backend.wants_fold() or backend.wants_checkpoint())

    async def _flush_pending(self) -> bool:
        """Commit what is pending; False if that failed (put back, retried later)."""
        batch, entries = self._take_batch()
        self._inflight_bytes = sum(len(c[2]) for c in batch.chunks)
        self._flushing = True
        try:
            if not self._commit_inline(batch):
                await self._call(self._w_limiter, self.backend.commit, batch)
        except JournalError as exc:
            self._flushing = False
            self._inflight_bytes = 0
            # Put the batch back in front of whatever arrived meanwhile; retried next flush.
            self.failures += 1
            self.last_error = str(exc)
            for entry in entries:
                entry.record.journaled = entry.prev
            self._restore(entries)
            # Back off (2 flush intervals, doubling, at most 1 s) while the journal fails.
            self._retry_delay = min(1.0, max(self._interval * 2, self._retry_delay * 2))
            await trio.sleep(self._retry_delay)
            self._wakeup.set()
            return False
        self._flushing = False
        self._committed(entries)
        return True

    def _committed(self, entries: list[_Pending]) -> None:
        """Bookkeeping after a successful transaction of ``entries``."""
        self._retry_delay = 0.0
        self._inflight_bytes = 0
        self._inline_refused = False
        if self._room is not None:
            self._room.set()
            self._room = None
        for entry in entries:
            entry.record.durable = entry.record.journaled
            entry.record.stored = True
        self.last_error = None
        self._signal_commit()

    def _commit_inline(self, batch: Batch) -> bool:
        """Commit ``batch`` on the event loop if the backend can without waiting (a small
        batch, the database not locked by another connection): True when it did. Saves the
        worker-thread round trip (about 135 us of CPU on the reference machine) that costs
        more than a small SQLite commit itself."""
        backend = self.backend
        if not backend.threaded or self._inflight_bytes > backend.inline_bytes:
            return False  # an unthreaded backend's commit is a plain call already (_call)
        if self._w_limiter.borrowed_tokens:
            return False  # a worker thread has the writer connection
        # No acquire and release around it: the commit is one synchronous call, so no task
        # can take the limiter meanwhile, and a thread only ever gets the writer connection
        # through it (about 8 µs less per commit than holding it).
        return backend.try_commit_inline(batch)

    def _flush_now(self) -> bool:
        """:meth:`commit`'s shortcut: the whole flush, synchronously, in the caller's task
        (no flush-loop wake-up, no thread). True when the batch is durable; False (the batch
        back in the queue) when it must go the usual way: the database is locked, or the
        write failed (counted; the flush loop retries with its back-off)."""
        batch, entries = self._take_batch()
        self._inflight_bytes = sum(len(c[2]) for c in batch.chunks)
        try:
            done = self._commit_inline(batch)
        except JournalError as exc:
            self.failures += 1
            self.last_error = str(exc)
            done = False
        if not done:
            self._inline_refused = True
            self._inflight_bytes = 0
            for entry in entries:
                entry.record.journaled = entry.prev
            self._restore(entries)
            return False
        self._committed(entries)
        self._last_inline = time.perf_counter()
        if self._maintenance_due():
            # Inline commits alone (short streams) never go through the flush loop: wake it
            # for the upkeep, or the tail and the WAL would grow without bound.
            self._wakeup.set()
        return True

    def _restore(self, entries: Iterable[_Pending]) -> None:
        newer = self._pending
        self._pending = {}
        for entry in entries:
            # Only the batch's own bytes: those appended meanwhile are already counted.
            self._pending_bytes += sum(len(c) for c in entry.chunks)
            later = newer.pop(entry.record.id, None)
            if later is not None:
                entry.chunks.extend(later.chunks)
                entry.full = entry.full or later.full
            self._pending[entry.record.id] = entry
        self._pending.update(newer)
        self._dirty = True

    def _signal_commit(self) -> None:
        self._commits += 1
        self._committed_event.set()
        self._committed_event = trio.Event()
