"""Test support, one module per job (imported as ``helpers.X``; tests/ is on the path):

    systems      the small structures the tests share (argon, ...)
    fake_ipi     one fake i-PI server speaking real bytes (``mlipd.protocols.ipi``)
    ipi_run      the real i-PI program against ``mlipd drive``, and the trajectory check
    server       ``mlipd serve`` as a process: plug-in models, raw ZeroMQ frames, memory
    ase_socket   ASE's real SocketIOCalculator against ``mlipd drive``
"""
