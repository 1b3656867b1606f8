"""keepstream's exception tree, all in one place.

::

    KeepstreamError
    ├── ConfigError            a bad configuration value; ``.key`` names it ("routes[0].prefix")
    ├── JournalError           the journal could not be opened, read or written
    └── ProxyError             raised by ``open_proxy`` from an ExceptionGroup of its tasks

Errors from httpx and the database drivers never leave keepstream untranslated: the stream task
maps httpx errors onto a terminal status (``upstream_error``/``timeout``), and the journal maps
``sqlite3`` errors onto ``JournalError``.
"""

from __future__ import annotations


class KeepstreamError(Exception):
    """Base class of every error keepstream raises on purpose."""


class ConfigError(KeepstreamError, ValueError):
    """A configuration key has a bad value (or is unknown). ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class JournalError(KeepstreamError):
    """The journal backend failed."""


class ProxyError(KeepstreamError):
    """A task of ``open_proxy`` failed; the ExceptionGroup is the ``__cause__``."""
