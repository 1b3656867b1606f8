"""What the SQLite journal costs per event of a paced load, without the proxy around it.

The paced scenario's journal share (``keepstream-lean`` minus ``keepstream-lean-none``, 5-9 us
per event on the reference machine) is this loop: every ``flush_interval_ms`` each open
stream has a few events pending; one transaction appends each stream's bytes as a row of the
unindexed ``tail`` table that carries its progress (``events``, ``last_event_id``; ``bytes``
is the row's end); every 4,096 tail rows (or 1 MiB) a fold moves them into the indexed
``chunks`` table, one row per stream; every 4 MiB of estimated WAL a checkpoint. Here the
same loop runs on the real ``JournalWriter`` bookkeeping and the real ``SQLiteBackend`` in
one thread, with no event loop, so what is left is the journal's own floor. Modes (each on a
fresh database file in a temporary directory):

* ``keepstream``: the real path: ``append`` per event, ``_take_batch``, ``commit``, and the
  backend's own upkeep as the writer runs it (``wants_fold``/``fold``, then
  ``wants_checkpoint``/``checkpoint``);
* ``chunks-only``: the layout of the morning of 2026-12-07: each stream-flush's piece straight
  into the indexed ``chunks`` table, carrying its progress (a page per chunk row in the WAL
  estimate), what the ``tail`` saves;
* ``progress-rows``: the layout before 2026-12-07: ``chunks-only``, plus each stream's
  progress updated in its ``streams`` row on every flush (one UPDATE per stream-flush).

The figure is this process's CPU (``time.process_time``) per event and per stream-flush (one
stream's rows in one flush), the median of ``--repeat`` runs, modes interleaved.

    python benchmarks/journal_floor.py                       # 200 streams, 2.5 events a flush
    python benchmarks/journal_floor.py --streams 2000 --events-per-flush 0.05 --flushes 400
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from keepstream._config import JournalConfig
from keepstream._journal import _INSERT_CHUNK, Batch, JournalWriter, SQLiteBackend
from keepstream._record import Record, new_instance_id, new_stream_id

MODES = ("keepstream", "chunks-only", "progress-rows")
EVENT = b"data: " + b"x" * 92 + b"\n\n"  # 100 bytes, as the paced scenario's
_PROGRESS_ROW = "UPDATE streams SET bytes = ?, events = ?, last_event_id = ? WHERE id = ?"


def _open(path: Path, n: int) -> tuple[SQLiteBackend, JournalWriter, list[Record]]:
    backend = SQLiteBackend(str(path))
    backend.setup()
    writer = JournalWriter(backend, JournalConfig(url=f"sqlite:///{path}"))
    instance = new_instance_id()
    records = [Record(id=new_stream_id(), instance=instance, route="/", method="GET",
                      path="/paced") for _ in range(n)]
    backend.commit(Batch(rows=[r.row() for r in records]))
    for r in records:
        r.stored = True
    return backend, writer, records


def _schedule(streams: int, per_flush: float, flushes: int) -> list[list[int]]:
    """Which streams have an event in each flush (spread evenly, ``per_flush`` on average)."""
    out: list[list[int]] = []
    acc = [i / streams for i in range(streams)]  # staggered phases
    for _ in range(flushes):
        due = []
        for i in range(streams):
            acc[i] += per_flush
            while acc[i] >= 1.0:
                acc[i] -= 1.0
                due.append(i)
        out.append(due)
    return out


def _check(backend: SQLiteBackend, records: list[Record], mode: str) -> None:
    """What was timed wrote every event: each body whole, each record's progress (as
    ``SQLiteBackend.get`` reads it) what the stream counted. Raises ``SystemExit`` if not."""
    for rec in records:
        want = EVENT * rec.events
        body = backend.read_body(rec.id)
        row = backend.get(rec.id)
        progress = None if row is None else (row["bytes"], row["events"], row["last_event_id"])
        if body != want or progress != (len(want), rec.events, rec.last_event_id):
            raise SystemExit(f"{mode}: stream {rec.id}: journal holds {len(body)} bytes "
                             f"(progress {progress}), the stream sent {len(want)}")


@dataclass
class Result:
    cpu: float  # seconds
    events: int
    stream_flushes: int  # a stream with something pending in a flush
    checkpoints: int


def run(mode: str, streams: int, per_flush: float, flushes: int,
        checkpoint: bool = True) -> Result:
    """``flushes`` flushes of ``mode`` on a fresh journal file."""
    plan = _schedule(streams, per_flush, flushes)
    with tempfile.TemporaryDirectory() as tmp:
        backend, writer, records = _open(Path(tmp) / "journal.db", streams)
        conn = backend._writer
        events = touched = checkpoints = 0
        t0 = time.process_time()
        for due in plan:
            for i in due:
                rec = records[i]
                writer.append(rec, EVENT)
                rec.bytes += len(EVENT)
                rec.events += 1
                rec.last_event_id = str(rec.events)
            events += len(due)
            touched += len(set(due))
            batch, entries = writer._take_batch()
            if mode == "keepstream":
                backend.commit(batch)
            else:  # the earlier layouts: every piece into ``chunks``, a page per chunk row
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(_INSERT_CHUNK, batch.chunks)
                if mode == "progress-rows":
                    conn.executemany(_PROGRESS_ROW, [(o + len(d), ev, last, sid)
                                                     for sid, o, d, ev, last in batch.chunks])
                conn.execute("COMMIT")
                backend._since_checkpoint += sum(len(c[2]) for c in batch.chunks) + \
                    4096 * len(batch.chunks)
            writer._committed(entries)
            if backend.wants_fold():
                backend.fold()
            if checkpoint and backend.wants_checkpoint():
                backend.checkpoint()
                checkpoints += 1
        cpu = time.process_time() - t0
        _check(backend, records, mode)
        backend.close()
    return Result(cpu, events, touched, checkpoints)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--events-per-flush", type=float, default=2.5,
                    help="events per stream per flush (paced: 50/s x 50 ms = 2.5)")
    ap.add_argument("--flushes", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mode", choices=MODES, action="append")
    ap.add_argument("--no-checkpoints", action="store_true",
                    help="never checkpoint (what the WAL checkpoints cost: the difference)")
    args = ap.parse_args()
    modes = args.mode or list(MODES)
    got: dict[str, list[Result]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for m in modes:
            got[m].append(run(m, args.streams, args.events_per_flush, args.flushes,
                              checkpoint=not args.no_checkpoints))
    base = None
    print(f"{args.streams} streams, {args.events_per_flush} events per stream-flush, "
          f"{args.flushes} flushes, {len(EVENT)}-byte events, median of {args.repeat}"
          + (", no checkpoints" if args.no_checkpoints else ""))
    print(f"{'mode':<13} {'events':>8} {'us/event':>9} {'us/stream-flush':>16} "
          f"{'checkpoints':>12} {'vs keepstream':>14}")
    for m in modes:
        rs = got[m]
        per_event = statistics.median(r.cpu * 1e6 / max(r.events, 1) for r in rs)
        per_sf = statistics.median(r.cpu * 1e6 / max(r.stream_flushes, 1) for r in rs)
        if m == "keepstream":
            base = per_event
        ratio = f"{per_event / base:.2f}x" if base else "-"
        print(f"{m:<13} {rs[0].events:>8} {per_event:>9.2f} {per_sf:>16.2f} "
              f"{rs[0].checkpoints:>12} {ratio:>14}")


if __name__ == "__main__":
    main()
