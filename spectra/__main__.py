"""``python -m spectra``: the command line."""

from spectra_cli.main import run

run()
