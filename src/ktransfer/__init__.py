"""ktransfer: find and transfer complementary knowledge between pretrained classifiers."""

from ._version import __version__  # noqa: E402

from .api import TransferResult, transfer  # noqa: E402
from .data.base import ImageData  # noqa: E402
from .engine import Callback  # noqa: E402
from .errors import KTransferError  # noqa: E402
from .methods import create_method, method_names  # noqa: E402
from .models import Model, Preprocess, load_model  # noqa: E402
from .predictions import PredictionCache  # noqa: E402
from .multi import transfer_multi  # noqa: E402
from . import pretrain  # noqa: E402,F401  (registers the zoo:NAME model source)
from .settings import TransferSettings  # noqa: E402
from .scout import ScoutPredictor, ScoutResult, scout  # noqa: E402  (the function shadows the module name: import helpers from ktransfer.scout)

__all__ = ["Callback", "ImageData", "KTransferError", "Model", "PredictionCache", "Preprocess", "ScoutPredictor", "ScoutResult", "TransferResult", "TransferSettings", "__version__", "create_method", "load_model", "method_names", "scout", "transfer", "transfer_multi"]
