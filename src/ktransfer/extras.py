"""Optional dependencies: studies need pyyaml and pandas, reports matplotlib, parallel runs ray; none is needed for transfer itself."""

from __future__ import annotations

import importlib

from .errors import KTransferError


TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")  # the experiment trackers (ktransfer.tracking), each its own extra


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


def start_ray(address: str | None = None, purpose: str = "running on Ray"):
    """Connect to the Ray cluster at ``address``, or start a local instance sized to this machine (no dashboard).

    Returns the ``ray`` module and whether this call connected (then the caller ends it with
    ``ray.shutdown()``); an existing connection is used as it is.
    """
    ray = require("ray", "ray", purpose)
    if ray.is_initialized():
        return ray, False
    # A local instance: from Ray 2.59 token authentication is on by default, and ray.init() creates and
    # uses the token itself, so nothing needs configuring. A cluster with authentication needs its token
    # in RAY_AUTH_TOKEN (or Ray's default token file), as every Ray client does.
    quiet = dict(configure_logging=True, logging_level="warning", log_to_driver=False)
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(include_dashboard=False, **quiet)  # no dashboard unless asked: nothing here needs one
    return ray, True
