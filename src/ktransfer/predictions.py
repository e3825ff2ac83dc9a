"""Each model's eval-mode logits on a dataset, computed once and cached on disk.

The key is what determines the logits: the model's weights and preprocessing, and the data.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data.base import ImageData
from .models.base import Model
from .paths import atomic_path, cache_dir


@torch.inference_mode()
def compute_logits(model: Model, data: ImageData, batch_size: int = 1024, device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits ``[N, C]`` (float32, on the CPU) of ``model`` in eval mode; the module's mode is restored."""
    module = model.module
    was_training = module.training
    module.eval()
    try:
        order = torch.arange(len(data))
        chunks = [model.logits(images.to(device, non_blocking=True)).float().cpu() for _, images, _ in data.batches(order, batch_size)]
    finally:
        module.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, model.num_classes)


class PredictionCache:
    """Logits on disk under ``root`` (safetensors), with an in-memory copy of what was read."""

    def __init__(self, root: Path | None = None, enabled: bool = True):
        self.root = Path(root) if root is not None else cache_dir() / "predictions"
        self.enabled = enabled
        self._memory: dict[str, torch.Tensor] = {}

    def key(self, model: Model, data: ImageData) -> str:
        return f"{model.fingerprint()}-{data.fingerprint()}"

    def logits(self, model: Model, data: ImageData, batch_size: int = 1024, device: str | torch.device = "cpu") -> torch.Tensor:
        key = self.key(model, data)
        if key in self._memory:
            return self._memory[key]
        path = self.root / f"{key}.safetensors"
        logits = None
        if self.enabled and path.is_file():
            try:
                logits = load_file(path)["logits"]
            except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
                path.unlink(missing_ok=True)
        if logits is None:
            logits = compute_logits(model, data, batch_size, device)
            if self.enabled:
                # Processes that compute the same entry at once (a study's parallel workers) each write a whole file.
                with atomic_path(path) as tmp:
                    save_file({"logits": logits.contiguous()}, tmp)
        self._memory[key] = logits
        return logits

    def predictions(self, model: Model, data: ImageData, **kwargs) -> torch.Tensor:
        return self.logits(model, data, **kwargs).argmax(dim=1)
