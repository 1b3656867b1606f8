"""One worker process of ``keepstream serve --workers N`` (started by ``_workers``)."""

from __future__ import annotations

import json
import os
import socket
import sys

import trio

from ._config import SHUTDOWN_MARGIN, Config
from ._server import serve
from ._workers import CONFIG_ENV


def main(argv: list[str]) -> int:
    config = Config.from_mapping(json.loads(os.environ[CONFIG_ENV]))
    sock = socket.socket(fileno=int(argv[1]))
    sock.setblocking(False)
    hard_exit = config.server.persist_timeout + SHUTDOWN_MARGIN + 1.0
    # Recovery ran in the parent before any worker started: a worker must never orphan the
    # live records of its siblings.
    ready_fd = int(argv[2])

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve(
                config, sock=sock, recover=False, hard_exit_after_drain=hard_exit,
                task_status=task_status))
            os.write(ready_fd, b"r")  # signal receiver installed, serving
            os.close(ready_fd)

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
