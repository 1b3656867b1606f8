"""``keepstream serve --workers N``: N worker processes sharing one listening socket.

The parent creates the listening socket (with ``TCP_USER_TIMEOUT``), runs start-up recovery once
on the journal, then starts N workers as fresh interpreters (``python -m keepstream._worker``),
each in its own session so a terminal's Ctrl-C reaches only the parent. Each worker creates its
own upstream pool and journal connection after it starts (I7). The parent forwards SIGTERM/SIGINT
to every worker as SIGTERM (a second signal is forwarded again: workers then skip the rest of the
drain) and exits 0 once every worker exited 0. A worker that dies is not restarted: the parent
then stops the others and exits 1, so the platform restarts the whole process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from ._config import Config
from ._journal import open_backend
from ._record import new_instance_id
from ._server import create_listen_socket

CONFIG_ENV = "KEEPSTREAM_WORKER_CONFIG"


def config_to_json(config: Config) -> str:
    data = dataclasses.asdict(config)
    data["routes"] = list(data["routes"])
    return json.dumps(data)


def run_workers(config: Config) -> int:
    sock = create_listen_socket(config)
    backend = open_backend(config.journal.url)
    backend.setup()
    orphaned = backend.recover(new_instance_id())
    backend.close()
    if orphaned:
        print(f"keepstream: {orphaned} record(s) left open by a previous run are now orphaned",
              file=sys.stderr, flush=True)
    host, port = sock.getsockname()[:2]
    env = dict(os.environ, **{CONFIG_ENV: config_to_json(config)})
    ready_r, ready_w = os.pipe()
    pending = 0  # signals received but not yet forwarded
    forwarded = 0
    ready = False
    procs: list[subprocess.Popen[bytes]] = []

    def forward_pending() -> None:
        nonlocal forwarded
        while forwarded < pending:
            forwarded += 1
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal pending
        pending += 1
        if ready:
            forward_pending()  # at once: readiness must turn false within milliseconds

    # A signal that arrives while workers start is held until they can take it (each worker
    # reports ready once its own signal receiver is installed).
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs += [
        subprocess.Popen(
            [sys.executable, "-m", "keepstream._worker", str(sock.fileno()), str(ready_w)],
            pass_fds=[sock.fileno(), ready_w], env=env, start_new_session=True,
        )
        for _ in range(config.server.workers)
    ]
    os.close(ready_w)
    sock.close()  # the workers hold it now
    got = b""
    while len(got) < len(procs):
        chunk = os.read(ready_r, 64)
        if not chunk:
            break  # a worker died before it was ready
        got += chunk
    os.close(ready_r)
    ready = True
    if len(got) == len(procs):
        print(f"keepstream listening on http://{host}:{port} ({len(procs)} workers)",
              flush=True)
    else:
        print("keepstream: a worker failed to start", file=sys.stderr, flush=True)
        pending += 1
    codes: dict[int, int] = {}
    while len(codes) < len(procs):
        forward_pending()
        for i, p in enumerate(procs):
            if i not in codes and (code := p.poll()) is not None:
                codes[i] = code
                if code != 0 and forwarded == 0:
                    print(f"keepstream: worker {p.pid} exited with {code}; stopping",
                          file=sys.stderr, flush=True)
                    pending += 1
        time.sleep(0.02)
    return 0 if all(c == 0 for c in codes.values()) and forwarded else 1
