"""``mlipd bench``: every performance table of the project, reproduced by one command.

Each suite (``mlipd.bench.suites.<name>``) measures its contenders side by side in one
run, prints its table and writes ``<out>/<suite>-<device>.md`` (with the machine,
versions, commit, load and command) and, where a curve says more, a PNG beside it.
Sizes: ``tiny`` (seconds: what the tests run), ``quick`` (minutes on a 2-core CPU),
``full`` (the published tables).
"""
