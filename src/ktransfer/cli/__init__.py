"""The ``ktransfer`` command: a thin layer over the Python API. One module per command, each registered on the group."""

from __future__ import annotations

from .group import main
from . import data_cmd, demo_cmd, methods_cmd, transfer_cmd  # noqa: E402,F401  (register the commands)
from . import analyze_cmd, report_cmd, study_cmd  # noqa: E402,F401
from . import adapt_cmd  # noqa: E402,F401
from . import precompute_cmd, scout_cmd  # noqa: E402,F401

__all__ = ["main"]
