"""``hypercorn --worker-class trio keepstream.asgi:app``: config from ``KEEPSTREAM_CONFIG``.

Nothing is opened at import time (I7): the config is read and the journal and upstream client are
created in the lifespan start-up, inside the worker process.
"""

from ._asgi_app import create_app

app = create_app()

__all__ = ["app"]
