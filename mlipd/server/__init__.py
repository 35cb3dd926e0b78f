"""mlipd as a server: ZeroMQ front end, i-PI links, batching scheduler, engine worker.

``Server`` (``mlipd.server.app``) composes them; ``mlipd serve`` (``mlipd.server.cli``)
runs one until SIGINT/SIGTERM, and ``mlipd drive`` (``mlipd.server.drive``) runs one
with i-PI links only until they end.
"""
