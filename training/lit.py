"""The one LightningModule: wraps any DynamicsModel, MSE on the next bin's scaled state."""

from __future__ import annotations

import lightning as L
import torch

from training.models import DynamicsModel


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real (unpadded) bins and all 18 variables."""
    err = (pred - target) ** 2 * mask[..., None]
    return err.sum() / (mask.sum() * pred.shape[-1]).clamp_min(1.0)


class LitDynamics(L.LightningModule):
    def __init__(self, model: DynamicsModel, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return masked_mse(self.model(batch["x"]), batch["y"], batch["mask"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        n = int(batch["mask"].sum())
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        n = int(batch["mask"].sum())
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def build_optimizer(params, lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam, with torch's fused kernel where every parameter's device has one.

    The default Adam updates parameter by parameter with ~10 tensor operations each (22
    tensors for a 2-layer CfC): about 1 ms per step on one CPU core, against ~0.4 ms for the
    fused update of the same formula. bench/train_speed.py uses this too.
    """
    params = list(params)
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params
    )
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
