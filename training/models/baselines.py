"""Honest baselines: the last value carried forward, and ridge regression on the last bin."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from features.catalog import N_STATE
from training.models.base import N_INPUT, DynamicsModel, ModelConfig


class Persistence(DynamicsModel):
    """Predicts that the next bin equals the current one (in a rollout: stays constant)."""

    def forward(self, x: Tensor) -> Tensor:
        return x[..., :N_STATE]


class Linear(DynamicsModel):
    """Ridge regression of the next state on bin t's 39 inputs, fitted in closed form.

    The ridge target is the change ``state_{t+1} - state_t`` (with ``residual``), so the penalty
    shrinks towards persistence rather than towards zero.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.linear = nn.Linear(N_INPUT, N_STATE)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self._out(x, self.linear(x))

    def fit_ridge(self, x: np.ndarray, y: np.ndarray) -> None:
        """Fit on rows ``x`` (n, 39) -> next scaled state ``y`` (n, 18)."""
        from sklearn.linear_model import Ridge

        target = y - x[:, :N_STATE] if self.cfg.residual else y
        ridge = Ridge(alpha=self.cfg.ridge_alpha).fit(x, target)
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(ridge.coef_, dtype=torch.float32))
            self.linear.bias.copy_(torch.as_tensor(ridge.intercept_, dtype=torch.float32))
