"""Instructions per request of ``keepstream serve`` (valgrind callgrind): an A/B figure that a
noisy, shared machine does not move.

Wall-clock CPU per request (``run.py --scenario ttfb``) moves by 10-30% between runs here; the
instructions a process executes for the same requests repeat to about 0.1-0.4% in total, 1-2%
in the per-request figure (the difference of two totals) within one run; runs an hour apart
drifted by up to 3%, so compare trees in one run (``--src A --src B``); ``--repeat`` shows the
spread. This runs
``keepstream serve`` under ``valgrind --tool=callgrind`` twice per source tree (once answering no
request, once ``--requests`` sequential ones, a new connection each, as the ttfb scenario) and
prints the difference per request. User-space instructions only: system-call time is not in it,
so a change that adds or removes system calls needs ``strace -c`` as well.

    python benchmarks/instructions.py                                 # this checkout
    python benchmarks/instructions.py --src /tmp/base/src --src src   # A/B, same run
    python benchmarks/instructions.py --engine hypercorn --journal none
    python benchmarks/instructions.py --paced 20:5:60 --src /tmp/base/src --src src

Each run takes about 30-60 s (valgrind runs the server some 50 times slower).

``--paced STREAMS:RATE:EVENTS`` measures instructions per relayed event instead: STREAMS
concurrent paced SSE streams (``/paced``, RATE events per second each), once with EVENTS events
per stream and once with ``PACED_BASE`` (the streams' set-up and end in both); the figure is the
difference over the events between them. Keep STREAMS x RATE low (100 events/s under valgrind
is about a fifth of the server's time): each event is then read and relayed on its own, as in
the idle scenario, so the figure counts a whole wake per event (the paced scenario's 10,000
events/s share a wake between several).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import Proc, _free_port, _wait_port  # noqa: E402  (the suite's own process helpers)

PY = sys.executable


#: ``--paced``: the events per stream of the run whose total is subtracted.
PACED_BASE = 2


def measure(src: str, requests: int, engine: str, journal: str, workdir: Path,
            load: list[str] | None = None) -> int:
    """Total instructions of one ``keepstream serve`` process that answered ``requests``
    (sequential one-event requests), or ran ``load`` (loadgen.py's arguments) instead."""
    up_port, ks_port = _free_port(), _free_port()
    out = workdir / f"cg-{time.monotonic_ns()}.out"
    db = workdir / "journal.db"
    for p in workdir.glob("journal.db*"):
        p.unlink()
    url = f"sqlite:///{db}" if journal == "sqlite" else journal
    env = {"PYTHONPATH": src} if src else {}
    upstream = Proc("upstream", [PY, str(HERE / "upstream.py"), "--port", str(up_port)],
                    workdir / "upstream.log", None)
    server = Proc("keepstream", [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-line=no",
        PY, "-m", "keepstream", "serve", "--bind", f"127.0.0.1:{ks_port}",
        "--upstream", f"http://127.0.0.1:{up_port}", "--engine", engine, "--journal", url,
    ], workdir / "keepstream.log", None, env=env)
    try:
        _wait_port(upstream, up_port)
        _wait_port(server, ks_port, timeout=180)
        if requests and load is None:
            load = ["--path", "/bulk?events=1", "--streams", str(requests), "--sequential",
                    "--expect", "1"]
        if load:
            subprocess.run([PY, str(HERE / "loadgen.py"), "--target", f"127.0.0.1:{ks_port}",
                            *load, "--timeout", "900"], check=True, stdout=subprocess.DEVNULL)
        time.sleep(1.0)
        server.p.send_signal(signal.SIGINT)  # a graceful stop: callgrind writes its totals
        try:
            server.p.wait(120)
        except subprocess.TimeoutExpired:
            pass
    finally:
        server.stop()
        upstream.stop()
    text = out.read_text(errors="replace")
    out.unlink()
    found = re.search(r"^summary: (\d+)", text, re.M)
    if found is None:
        raise SystemExit("callgrind wrote no summary line")
    return int(found.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", action="append", default=None,
                   help="a source tree to put first on PYTHONPATH (repeat for A/B; default: "
                        "the installed keepstream)")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--engine", default="lean", choices=["lean", "hypercorn"])
    p.add_argument("--journal", default="sqlite", help="sqlite (a fresh file) or a journal URL")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--paced", metavar="STREAMS:RATE:EVENTS", default=None,
                   help="instructions per relayed event of paced streams (see above)")
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    with tempfile.TemporaryDirectory(prefix="ks-instr-") as tmp:
        work = Path(tmp)
        if args.paced:
            streams, rate, events = (int(x) for x in args.paced.split(":"))
            if events <= PACED_BASE:
                raise SystemExit(f"--paced: EVENTS must be more than {PACED_BASE}")

            def paced(n: int) -> list[str]:
                return ["--path", f"/paced?events={n}&rate={rate}", "--streams",
                        str(streams), "--expect", str(n)]

            for src in args.src or [""]:
                for _ in range(args.repeat):
                    base = measure(src, 0, args.engine, args.journal, work,
                                   paced(PACED_BASE))
                    total = measure(src, 0, args.engine, args.journal, work, paced(events))
                    per = (total - base) / (streams * (events - PACED_BASE))
                    print(f"{src or '(installed)'}: {total:,} instructions for {streams} "
                          f"streams x {events} events, {base:,} for x {PACED_BASE}: "
                          f"{per / 1e3:.1f}K per event", flush=True)
            return
        for src in args.src or [""]:
            base = measure(src, 0, args.engine, args.journal, work)
            for _ in range(args.repeat):
                total = measure(src, args.requests, args.engine, args.journal, work)
                per = (total - base) / args.requests
                print(f"{src or '(installed)'}: {total:,} instructions for {args.requests} "
                      f"requests, {base:,} for none: {per / 1e6:.3f}M per request", flush=True)


if __name__ == "__main__":
    main()
