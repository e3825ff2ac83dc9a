"""The version of ktransfer, in a module of its own: nothing inside the package imports the package face for it."""

__version__ = "0.1.0"
