"""The one LightningModule: wraps any DynamicsModel and trains it for how it is used.

``closed_loop`` (default) scores the clipped, fed-back K-step rollouts evaluation and the
service run (:func:`training.rollout.every_start_rollouts`) on measured target values, before
their combination with the model's direct ridge (docs/results.md: scoring the combination
was no better); ``teacher_forced`` is the paper's one-step MSE. Validation always reports the
closed-loop error ``val_rollout_mse`` beside the objective's ``val_loss`` (docs/training.md,
"Training").
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch

from features.catalog import N_STATE
from training.models import DynamicsModel, ModelConfig, build_model
from training.rollout import every_start_rollouts

Objective = Literal["closed_loop", "teacher_forced"]


def _targets(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled state and observed mask of every bin of padded inputs (B, T, 39)."""
    return x[..., :N_STATE], x[..., N_STATE : 2 * N_STATE]


def teacher_forced_errors(
    model: DynamicsModel, x: torch.Tensor, lengths: torch.Tensor, measured_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squared one-step errors and the number of values they cover."""
    pred = model(x[:, :-1])
    state, observed = _targets(x[:, 1:])
    live = (torch.arange(x.shape[1] - 1, device=x.device)[None] < (lengths[:, None] - 1)).to(
        x.dtype
    )
    w = live[..., None] * (observed if measured_only else torch.ones_like(observed))
    return ((pred - state) ** 2 * w).sum(), w.sum()


def rollout_errors(
    model: DynamicsModel,
    x: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    bounds: tuple[torch.Tensor, torch.Tensor] | None,
    measured_only: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-loop K-step rollouts from every start bin
    (:func:`training.rollout.every_start_rollouts`): per-step squared error sums (K,) and
    value counts (K,)."""
    members = getattr(model, "members", None)
    if members is not None and torch.is_grad_enabled():
        # Training a deep ensemble: each member on its own rollout (independent members).
        parts = [rollout_errors(m, x, lengths, k, bounds, measured_only) for m in members]
        return (
            torch.stack([p[0] for p in parts]).mean(dim=0),
            torch.stack([p[1] for p in parts]).mean(dim=0),
        )
    rows, starts, pred = every_start_rollouts(model, x, lengths, k, bounds)
    target = starts[:, None] + torch.arange(1, k + 1, device=x.device)  # (W, K)
    alive = (target <= lengths[rows, None] - 1).to(x.dtype)[..., None]
    target = target.clamp_max(x.shape[1] - 1)
    state, observed = _targets(x)
    w = alive * (observed[rows[:, None], target] if measured_only else torch.ones_like(pred))
    err = (pred - state[rows[:, None], target]) ** 2 * w
    return err.sum(dim=(0, 2)), w.sum(dim=(0, 2))


class LitDynamics(L.LightningModule):
    """Builds the model from its config (so a checkpoint says what it is) and trains it."""

    def __init__(
        self,
        model_config: dict,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        objective: Objective = "closed_loop",
        rollout_k: int = 5,
        measured_only: bool = True,
        bounds: tuple[list[float], list[float]] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(ModelConfig.from_dict(model_config))
        if bounds is not None:
            self.register_buffer("lo", torch.tensor(bounds[0], dtype=torch.float32))
            self.register_buffer("hi", torch.tensor(bounds[1], dtype=torch.float32))
        else:
            self.lo = self.hi = None

    def _loss(
        self, batch: dict[str, torch.Tensor], objective: Objective | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean squared error under ``objective`` (default: the training objective) and the
        number of values it covers."""
        hp, x, lengths = self.hparams, batch["x"], batch["lengths"]
        if (objective or hp.objective) == "teacher_forced":
            sse, n = teacher_forced_errors(self.model, x, lengths, hp.measured_only)
        else:
            bounds = None if self.lo is None else (self.lo, self.hi)
            sums, counts = rollout_errors(
                self.model, x, lengths, hp.rollout_k, bounds, hp.measured_only
            )
            sse, n = sums.sum(), counts.sum()
        return sse / n.clamp_min(1.0), n

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, n = self._loss(batch)
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, batch_size=int(n), sync_dist=True
        )
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n = self._loss(batch, "closed_loop")
        self.log(
            "val_rollout_mse",
            loss,
            on_epoch=True,
            prog_bar=True,
            batch_size=max(int(n), 1),
            sync_dist=True,
        )
        if self.hparams.objective != "closed_loop":  # else the objective is that very error
            loss, n = self._loss(batch)
        self.log("val_loss", loss, on_epoch=True, batch_size=max(int(n), 1), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW (decoupled weight decay; plain Adam when it is 0), fused on CPU / CUDA."""
        params = list(self.parameters())
        fused = bool(params) and all(
            p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params
        )
        hp = self.hparams
        return torch.optim.AdamW(
            params, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused or None
        )
