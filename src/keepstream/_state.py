"""The stream record's lifecycle: every status transition lives in this file.

Rules (invariant I1):

* A record is created ``open`` before the first upstream byte is forwarded.
* ``open`` moves to exactly one terminal status, once. Terminal statuses never change, except
  that start-up recovery may turn a record left ``open`` by a dead instance into ``orphaned``
  (which is itself a move from ``open``).
* Which terminal status a stream gets is decided by *why* it ended, in this order of precedence:
  an explicit cancel (endpoint, or client gone under ``on_disconnect = "cancel"``) is
  ``cancelled``; shutdown past the drain deadline is ``interrupted``; a route deadline is
  ``timeout``; a failed upstream is ``upstream_error``; the upstream's end of body is
  ``completed``.

Sans-IO: no trio, no clock; times are passed in.
"""

from __future__ import annotations

import enum


class Status(enum.StrEnum):
    """A record's status: ``open`` while the stream runs, then exactly one terminal status."""

    OPEN = "open"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    UPSTREAM_ERROR = "upstream_error"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"
    ORPHANED = "orphaned"


TERMINAL: frozenset[Status] = frozenset(s for s in Status if s is not Status.OPEN)

_ALLOWED: dict[Status, frozenset[Status]] = {Status.OPEN: TERMINAL}


class Ending(enum.Enum):
    """Why a stream task stopped; mapped to a terminal status by :func:`terminal_status`."""

    UPSTREAM_DONE = "upstream finished its body"
    UPSTREAM_FAILED = "upstream failed"
    DEADLINE = "route deadline"
    CANCEL_REQUESTED = "cancel requested"
    CLIENT_GONE_CANCEL = "client left under on_disconnect=cancel"
    SHUTDOWN = "shutdown after drain deadline"


_ENDING_STATUS: dict[Ending, Status] = {
    Ending.UPSTREAM_DONE: Status.COMPLETED,
    Ending.UPSTREAM_FAILED: Status.UPSTREAM_ERROR,
    Ending.DEADLINE: Status.TIMEOUT,
    Ending.CANCEL_REQUESTED: Status.CANCELLED,
    Ending.CLIENT_GONE_CANCEL: Status.CANCELLED,
    Ending.SHUTDOWN: Status.INTERRUPTED,
}

# Precedence when several causes are known at once (lower wins).
_PRECEDENCE: dict[Ending, int] = {
    Ending.CANCEL_REQUESTED: 0,
    Ending.CLIENT_GONE_CANCEL: 1,
    Ending.SHUTDOWN: 2,
    Ending.DEADLINE: 3,
    Ending.UPSTREAM_FAILED: 4,
    Ending.UPSTREAM_DONE: 5,
}


class InvalidTransition(Exception):
    pass


def check_transition(old: Status, new: Status) -> None:
    """Raise :class:`InvalidTransition` unless ``old -> new`` is allowed."""
    if new not in _ALLOWED.get(old, frozenset()):
        raise InvalidTransition(f"{old} -> {new}")


def pick_ending(causes: list[Ending]) -> Ending:
    """The cause that decides the terminal status when several are known."""
    if not causes:
        raise ValueError("a stream ended with no known cause")
    return min(causes, key=_PRECEDENCE.__getitem__)


def terminal_status(ending: Ending) -> Status:
    return _ENDING_STATUS[ending]
