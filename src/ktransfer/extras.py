"""Optional dependencies: studies need pyyaml and pandas, reports matplotlib; none is needed for transfer itself."""

from __future__ import annotations

import importlib

from .errors import KTransferError


class MissingExtraError(KTransferError):
    """An optional package is missing; the message names the extra that brings it."""


def require(module: str, extra: str, purpose: str):
    """Import ``module`` or fail with the one command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = {"yaml": "pyyaml"}.get(module.split(".")[0], module.split(".")[0])
        raise MissingExtraError(f"{purpose} needs {package}, which is not installed; run: pip install 'ktransfer[{extra}]'") from None


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
