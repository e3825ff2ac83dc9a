"""Transfer methods, registered by name. One file per family."""

from . import kl, supervised  # noqa: F401  (registers the methods)
from .base import METHODS, Hyperparameters, LossOutput, Method, StepInputs, create_method, hparam, method_names, register_method

__all__ = ["METHODS", "Hyperparameters", "LossOutput", "Method", "StepInputs", "create_method", "hparam", "method_names", "register_method"]
