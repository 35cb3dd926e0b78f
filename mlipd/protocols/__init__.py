"""Wire formats as pure code: bytes in, typed messages out, and back.

No sockets and no torch here, so every codec can be fuzzed on its own.
``ipi`` is the i-PI socket protocol (atomic units, i-PI's layout); ``convert``
turns its messages into mlipd's Å/eV values and back.
"""
