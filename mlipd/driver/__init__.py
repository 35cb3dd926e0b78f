"""mlipd's i-PI client side, per connection: ``loop.py`` (the state machine of one
connection), ``socket_io.py`` and ``shm.py`` (addresses and transports),
``template.py`` (what i-PI never sends), ``progress.py`` (the periodic log line).

The link that uses them for ``mlipd drive`` and ``mlipd serve --ipi`` is
``mlipd.server.ipi_link``.
"""
