"""Runnable examples of embedding keepstream in a Trio service (see docs/embedding.md).

Each module runs on its own (``python examples/embed_transform.py``) and exposes an async
function the tests drive with a given upstream URL and port 0.
"""
