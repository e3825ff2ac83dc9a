"""Scoring the student after an epoch: on the evaluation set, and (for the guard) on held-out data."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..data.base import ImageData
from ..distributed import OneProcess
from ..metrics import accuracy, transfer_metrics
from ..models.base import Model
from ..predictions import compute_logits

if TYPE_CHECKING:
    from ..distributed import Ranks


class Evaluator:
    """Scores a student on the evaluation set against its pre-transfer predictions and the teachers'."""

    def __init__(self, data: ImageData, before: torch.Tensor | None = None, teacher: torch.Tensor | None = None, batch_size: int = 1024, device="cpu", references: dict[str, torch.Tensor] | None = None, ranks: Ranks | None = None):
        self.data, self.before, self.teacher = data, before, teacher
        self.batch_size, self.device = batch_size, device
        # Under torchrun each rank predicts its share and the predictions are gathered by sample index.
        self.ranks: Ranks | OneProcess = ranks if ranks is not None else OneProcess()
        # Extra students to compare against, by name (sequential transfer: the very first student).
        self.references = dict(references or {})
        self.last_predictions: torch.Tensor | None = None

    def predict(self, student: Model) -> torch.Tensor:
        """The student's top-1 predictions on the whole evaluation set (each sample once, also under torchrun)."""
        mine = compute_logits(student, self.ranks.eval_share(self.data), self.batch_size, self.device).argmax(1)
        return self.ranks.gather_by_index(mine, len(self.data))

    def __call__(self, student: Model) -> dict:
        predictions = self.predict(student)
        self.last_predictions = predictions
        if self.before is None:
            return {"acc": accuracy(self.data.labels, predictions), "n_eval": len(self.data)}
        metrics = transfer_metrics(self.data.labels, self.before, predictions, self.teacher)
        metrics["acc"] = metrics["acc_after"]
        for name, reference in self.references.items():
            versus = transfer_metrics(self.data.labels, reference, predictions)
            metrics.update({f"{key}_vs_{name}": versus[key] for key in ("acc_before", "delta", "knowledge_gain", "knowledge_loss")})
        return metrics
