"""mlipd as a server: ZeroMQ front end, i-PI links, batching scheduler, engine worker.

``Server`` (``mlipd.server.app``) composes them; ``mlipd serve`` (``mlipd.server.cli``)
runs one until SIGINT/SIGTERM.
"""
