"""The ``spectra`` command line (installed as the ``spectra_cli`` package): a thin shell over the library."""
