"""The upstream poller: one task that reads every waiting upstream socket, so a paced event
costs no scheduler step of its own.

Why: in a paced or idle stream almost every upstream read follows a wait. Through trio each
wait is a task step: the task is rescheduled, resumes through its coroutine frames and cancel
scopes, reads, and re-arms its (one-shot) registration in trio's epoll: a cost paid per event
on top of the read itself. ``benchmarks/wakeup_floor.py`` (200 sockets at 50
messages/s, no HTTP, no journal, this project's 2-core machine, 2026-12-04): a task per socket
costs 26.6-30.5 us of CPU per message, one task reading the sockets that a level-triggered
epoll of its own reports ready 22.1-23.9 us. In keepstream's paced benchmark the poller took a
paced event from 65.9 to 57.6 us (docs/performance.md).

How: a stream whose body can be read without waiting (``keepstream._transport._Body.
read_nowait``) registers its socket here and parks (no Event: ``wait_task_rescheduled``); the
poller task waits for its epoll's own descriptor through trio, then, without yielding, calls
each ready stream's ``on_readable()``, which reads, relays and journals what arrived. The
stream task wakes only when it has to act: the body ended or failed, the journal wants it to
wait for room, or its scope was cancelled. Everything that can fail in a handler is caught
there and re-raised in the stream task, so the stream's error handling is unchanged.

Level-triggered: a socket stays registered for its stream's whole wait (no system call per
event to re-arm it), and one that is still readable after its handler (a read that filled the
buffer) is reported again in the next round. At most ``MAX_EVENTS`` handlers run per round,
then the poller yields to the scheduler, so a busy set of streams cannot starve other tasks.

Linux only (``select.epoll``); elsewhere ``UpstreamPoller.create()`` gives None and streams
read through trio as before.
"""

from __future__ import annotations

import select
from typing import Protocol

import trio

__all__ = ["PollTarget", "UpstreamPoller"]

#: Ready sockets handled per round before the poller yields to trio's scheduler.
MAX_EVENTS = 128


class PollTarget(Protocol):
    def on_readable(self) -> None:
        """Read and handle what the socket holds, without waiting; never raises ``Exception``."""

    def on_poller_gone(self) -> None:
        """The poller stopped: wait some other way from now on."""


class UpstreamPoller:
    """See the module docstring. ``run`` is the task; ``add``/``discard`` register sockets."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._targets: dict[int, PollTarget] = {}
        self._scope = trio.CancelScope()
        self.closed = False

    @classmethod
    def create(cls) -> UpstreamPoller | None:
        """A poller, or None where there is no epoll (or no descriptor left for one): the
        streams then wait through trio, as they can everywhere."""
        if not hasattr(select, "epoll"):
            return None
        try:
            return cls()
        except OSError:
            return None

    def __len__(self) -> int:
        return len(self._targets)

    def add(self, fd: int, target: PollTarget) -> bool:
        """Call ``target.on_readable()`` whenever ``fd`` is readable, until ``discard(fd)``.
        False (nothing registered) once the poller has stopped."""
        if self.closed:
            return False
        self._ep.register(fd, select.EPOLLIN)
        self._targets[fd] = target
        return True

    def discard(self, fd: int) -> None:
        """Stop watching ``fd``; a no-op if it is not watched. Call it before closing ``fd``."""
        if self._targets.pop(fd, None) is not None:
            self._ep.unregister(fd)

    def stop(self) -> None:
        """End ``run``: every target still registered gets ``on_poller_gone()``."""
        self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ep = self._ep
        targets = self._targets
        fd = ep.fileno()
        task_status.started()
        try:
            with self._scope:
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    for ready, _ in ep.poll(0, MAX_EVENTS):
                        target = targets.get(ready)
                        if target is not None:  # (discarded by an earlier handler this round)
                            target.on_readable()
        finally:
            self.closed = True
            targets = dict(self._targets)
            self._targets.clear()
            for target in targets.values():
                target.on_poller_gone()
            trio.lowlevel.notify_closing(fd)
            ep.close()
