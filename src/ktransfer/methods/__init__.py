"""Transfer methods, registered by name. One file per family."""

from . import contrastive, ensemble, kl, kl_family, mcl, supervised  # noqa: F401  (registers the methods)
from .base import METHODS, Hyperparameters, LossOutput, Method, StepInputs, create_method, hparam, method_names, register_method

# The paper's comparison, from the methods that overwrite the student to those that keep it.
PAPER_ORDER = ("kl", "xe_kl", "soft_ce", "cd", "cd_authors", "crd", "xe_kl_mcl", "kl_dp", "kl_dp_unsup")


def transfer_method_names() -> list[str]:
    """Every registered method that learns from a teacher (all but supervised baselines such as ``ce``), in the paper's order."""
    names = [name for name in method_names() if METHODS[name].needs_teacher]
    return sorted(names, key=lambda name: (PAPER_ORDER.index(name) if name in PAPER_ORDER else len(PAPER_ORDER), name))


__all__ = ["METHODS", "Hyperparameters", "LossOutput", "Method", "StepInputs", "create_method", "hparam", "method_names", "register_method", "transfer_method_names"]
