"""mlipd as an i-PI *client*: connects to i-PI or ASE SocketIOCalculator servers.

``serve_connection`` (loop.py) is the per-connection state machine, reusable by
``mlipd.server`` for its i-PI front ends; ``connect``/``FramedSocket``
(socket_io.py) the transport; ``cli.py`` the ``mlipd drive`` command.
"""
