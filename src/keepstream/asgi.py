"""``hypercorn --worker-class trio keepstream.asgi:app``: config from ``KEEPSTREAM_CONFIG``.

Nothing is opened at import time (I7): the config is read and the journal and upstream client are
created in the lifespan start-up, inside the worker process. At start-up the app also sets
``client_stall_timeout`` as ``TCP_USER_TIMEOUT`` on Hypercorn's listening sockets, so a client
that stops reading cannot hold a shutdown for ever.
"""

from ._asgi_app import create_app

app = create_app(tune_listeners=True)

__all__ = ["app"]
