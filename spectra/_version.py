"""The package version, in a module of its own so that any module can import it without importing
the package's public surface (``spectra/__init__.py`` imports nearly everything)."""

__version__ = "0.1.0"
