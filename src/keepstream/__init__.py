"""keepstream: a Trio streaming proxy where every stream, however it ends, leaves one durable
journal record with its exact upstream bytes and a terminal status."""

from ._asgi_app import create_app
from ._config import Config, JournalConfig, Route, ServerConfig
from ._errors import ConfigError, JournalError, KeepstreamError, ProxyError
from ._proxy import Proxy, StreamHandle, open_proxy
from ._rules import RequestRejected
from ._server import serve
from ._state import Status
from ._supervisor import StreamRefused

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "JournalConfig",
    "JournalError",
    "KeepstreamError",
    "Proxy",
    "ProxyError",
    "RequestRejected",
    "Route",
    "ServerConfig",
    "Status",
    "StreamHandle",
    "StreamRefused",
    "__version__",
    "create_app",
    "open_proxy",
    "serve",
]
