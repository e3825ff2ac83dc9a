"""The engine: one plain training loop every method, strategy and the zoo's pretraining run on.

- :mod:`.loop`: :class:`Engine`, the loop itself (one epoch reads in one sitting);
- :mod:`.runtime`: device, autocast, channels-last, DDP and compilation in that order, batch loading;
  one process behind the same interface as torchrun (:class:`ktransfer.distributed.OneProcess`);
- :mod:`.callbacks`: checkpoints, Ctrl-C, the guard, the rollback after a non-finite loss, progress,
  and the :class:`Callback` hooks trackers and users' own code use;
- :mod:`.state`: :class:`TrainState`, what the loop changes, saved and loaded whole;
- :mod:`.evaluation`: :class:`Evaluator`; :mod:`.config`: :class:`TrainConfig`.
"""

from .callbacks import Callback, Interrupted, Progress
from .config import TrainConfig, check_device
from .evaluation import Evaluator
from .loop import Engine
from .runtime import Prefetcher, Runtime, is_conv_net, plain_batches, uses_channels_last
from .state import TrainState

__all__ = ["Callback", "Engine", "Progress", "Evaluator", "Interrupted", "Prefetcher", "Runtime", "TrainConfig", "TrainState", "check_device", "is_conv_net", "plain_batches", "uses_channels_last"]
