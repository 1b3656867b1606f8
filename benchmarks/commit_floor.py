"""What a short stream's two durable journal commits cost, without the proxy around them.

Every stream commits twice before anyone is told: its creation (before the upstream is asked)
and its terminal row with its last bytes (before the client sees the end). In the ttfb
scenario (one event per stream) those two inline SQLite transactions are about a quarter of
keepstream-lean's CPU per request (py-spy, docs/performance.md). Here they run through the
real ``JournalWriter.commit_now`` and ``SQLiteBackend``, one stream after another, with no
I/O waits (inside ``trio.run`` only for the writer's limiter), on a fresh database file, with
the writer's own upkeep (fold, checkpoint) when due. Modes (schema variants of the
``streams`` table, to see what its indexes cost):

* ``keepstream``: the schema as shipped (rowid table, primary key on ``id``, indexes on
  ``status`` and ``created_at``);
* ``no-created-index``: without the ``created_at`` index (used by listing and pruning);
* ``without-rowid``: ``streams`` as a ``WITHOUT ROWID`` table keyed by ``id``.

The figure is this process's CPU (``time.process_time``) per commit, the median of
``--repeat`` runs, modes interleaved.

    python benchmarks/commit_floor.py --streams 3000 --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import trio

import keepstream._journal as journal
from keepstream._config import JournalConfig
from keepstream._journal import JournalWriter, SQLiteBackend
from keepstream._record import Record, new_instance_id, new_stream_id
from keepstream._state import Status

SCHEMA = journal._SCHEMA
_CREATED = "CREATE INDEX IF NOT EXISTS streams_created ON streams (created_at);\n"
MODES = {
    "keepstream": SCHEMA,
    "no-created-index": SCHEMA.replace(_CREATED, ""),
    "without-rowid": SCHEMA.replace("    owner TEXT\n);", "    owner TEXT\n) WITHOUT ROWID;"),
}
EVENT = b"data: " + b"x" * 92 + b"\n\n"


def run(mode: str, streams: int) -> tuple[float, float]:
    """CPU seconds per creation commit and per terminal commit (inside ``trio.run``: the
    writer's inline path takes its limiter as the event loop's task would; nothing awaits)."""
    return trio.run(_run, mode, streams)


async def _run(mode: str, streams: int) -> tuple[float, float]:
    assert MODES[mode] != SCHEMA or mode == "keepstream", f"{mode}: the schema did not change"
    journal._SCHEMA = MODES[mode]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "j.db"
            backend = SQLiteBackend(str(path))
            backend.setup()
            writer = JournalWriter(backend, JournalConfig(url=f"sqlite:///{path}"))
            instance = new_instance_id()
            records = [Record(id=new_stream_id(), instance=instance, route="/", method="GET",
                              path="/bulk?events=1") for _ in range(streams)]
            create = finish = 0.0
            for rec in records:
                t0 = time.process_time()
                assert writer.commit_now(rec)
                t1 = time.process_time()
                writer.append(rec, EVENT)
                rec.bytes += len(EVENT)
                rec.events += 1
                rec.finish(Status.COMPLETED, None)
                t2 = time.process_time()
                assert writer.commit_now(rec)
                if backend.wants_fold():
                    backend.fold()
                if backend.wants_checkpoint():
                    backend.checkpoint()
                t3 = time.process_time()
                create += t1 - t0
                finish += t3 - t2
            for rec in records:  # every row terminal, every body whole: or no figure
                row = backend.get(rec.id)
                if row is None or row["status"] != "completed" or \
                        backend.read_body(rec.id) != EVENT:
                    raise SystemExit(f"{mode}: stream {rec.id} not journaled whole: {row}")
            backend.close()
    finally:
        journal._SCHEMA = SCHEMA
    return create / streams, finish / streams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=3000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--mode", choices=[*MODES, "all"], default="all")
    args = p.parse_args()
    modes = list(MODES) if args.mode == "all" else [args.mode]
    got: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for m in modes:
            got[m].append(run(m, args.streams))
    print(f"{'mode':18} {'us/creation':>12} {'us/terminal':>12} {'us/stream':>10}")
    for m in modes:
        c = statistics.median(x[0] for x in got[m]) * 1e6
        f = statistics.median(x[1] for x in got[m]) * 1e6
        print(f"{m:18} {c:12.1f} {f:12.1f} {c + f:10.1f}")


if __name__ == "__main__":
    main()
