"""Errors a user can cause. The CLI prints them as one line, never a traceback."""


class KTransferError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class DataError(KTransferError):
    """Data that cannot be found or read."""


class ModelError(KTransferError):
    """A model spec that cannot be resolved or models that do not fit together."""


class ConfigError(KTransferError):
    """Options or hyperparameters that are unknown or out of range."""


class TrainingError(KTransferError):
    """Training that cannot go on (a non-finite loss, for example)."""
