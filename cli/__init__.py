"""The ``spectra`` command line (installed as the ``spectra_cli`` package): a thin shell over the library.

Importing torch, numpy, scipy and the library creates some 400 000 objects, and Python's cyclic
collector would walk them again and again while they load and at every later full collection:
about 0.3-0.6 s of a command's 2.5 s start on this project's 2-core CPU. So they are imported here
with the collector paused, then frozen (``gc.freeze``: moved to a generation no collection scans),
and the collector is turned back on as it was.
"""

import gc

_collector_was_on = gc.isenabled()
gc.disable()
try:
    import click  # noqa: F401
    import rich.console  # noqa: F401

    import spectra  # noqa: F401
finally:
    gc.freeze()
    if _collector_was_on:
        gc.enable()
del _collector_was_on
