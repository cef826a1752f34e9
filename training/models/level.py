"""A per-variable memory of the patient's measured level, around any recurrent network.

    y = network(x_t) + sum_j gain_j * (level_j - x_t)      (per variable)

``level_j`` are exponentially weighted means of the **measured** values up to bin t and the
mean of all measured values so far; a variable not yet measured has level = x_t (no pull).
Fed-back predictions carry an observed mask of 0, so a rollout relaxes towards the measured
level. Why, and why the gains are a ridge fit (:func:`fit_gains`): docs/training.md
(``--level-memory``) and docs/results.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from features.catalog import N_STATE
from training.models.base import DynamicsModel, ModelConfig, State

HALF_LIVES = (1.0, 3.0)  # bins of 12 h

# The parameter holds gain / 10: models saved when Adam trained the gains (the scale gave it
# reach at lr 1e-3) store them so, and must load unchanged.
_GAIN_SCALE = 10.0


def _decays(dtype: torch.dtype) -> Tensor:
    return torch.tensor([0.5 ** (1.0 / h) for h in HALF_LIVES], dtype=dtype).view(1, -1, 1)


def update_levels(memory: State, x: Tensor) -> tuple[State, Tensor]:
    """One bin of the level recurrence, batched: ``memory`` = [EWMA weighted sums, EWMA
    weights (B, len(HALF_LIVES), 18), sum and count of measured values (B, 18)], ``x`` (B, 39)
    the model input. Returns the new memory and the levels (B, len(HALF_LIVES) + 1, 18); a
    variable never measured so far has level = its state at t."""
    num, den, total, count = memory
    s, m = x[:, :N_STATE], x[:, N_STATE : 2 * N_STATE]
    d = _decays(x.dtype).to(x.device)
    num = d * num + (1 - d) * (m * s)[:, None]
    den = d * den + (1 - d) * m[:, None]
    total, count = total + m * s, count + m
    ewmas = torch.where(den > 0, num / den.clamp_min(1e-12), s[:, None])
    mean = torch.where(count > 0, total / count.clamp_min(1.0), s)
    return [num, den, total, count], torch.cat([ewmas, mean[:, None]], dim=1)


def empty_levels(batch: int, device: torch.device, dtype: torch.dtype) -> State:
    ew = torch.zeros(batch, len(HALF_LIVES), N_STATE, device=device, dtype=dtype)
    total = torch.zeros(batch, N_STATE, device=device, dtype=dtype)
    return [ew, ew.clone(), total, total.clone()]


def measured_levels(x: Tensor) -> Tensor:
    """Levels after every bin of inputs (..., n, 39), one stay or a batch of them:
    (..., n, len(HALF_LIVES) + 1, 18)."""
    batch = x.reshape(-1, *x.shape[-2:])
    memory = empty_levels(batch.shape[0], x.device, x.dtype)
    out = []
    for t in range(batch.shape[1]):
        memory, levels = update_levels(memory, batch[:, t])
        out.append(levels)
    if not out:
        return x.new_zeros(*x.shape[:-1], len(HALF_LIVES) + 1, N_STATE)
    return torch.stack(out, dim=1).reshape(*x.shape[:-1], len(HALF_LIVES) + 1, N_STATE)


def fit_gains(inputs: Sequence[np.ndarray], alpha: float) -> Tensor:
    """Per variable, a ridge regression (no intercept) of the change to the next bin's
    **measured** value on ``level_j - x_t``: the one-step least-squares pull, (len(HALF_LIVES)
    + 1, 18). ``inputs``: each stay's model inputs (n, 39); stays without a next bin add
    nothing, a variable never measured at a next bin gets gains 0."""
    from sklearn.linear_model import Ridge

    pulls, changes, measured = [], [], []
    for x in inputs:
        if len(x) < 2:
            continue
        t = torch.from_numpy(np.asarray(x, dtype=np.float64))
        s = t[:, :N_STATE]
        pulls.append((measured_levels(t) - s[:, None])[:-1].numpy())
        changes.append((s[1:] - s[:-1]).numpy())
        measured.append(t[1:, N_STATE : 2 * N_STATE].numpy() > 0)
    gains = np.zeros((len(HALF_LIVES) + 1, N_STATE))
    if not pulls:
        return torch.from_numpy(gains)
    a, b, m = np.concatenate(pulls), np.concatenate(changes), np.concatenate(measured)
    for v in range(N_STATE):
        if m[:, v].any():
            fit = Ridge(alpha=alpha, fit_intercept=False).fit(a[m[:, v], :, v], b[m[:, v], v])
            gains[:, v] = fit.coef_
    return torch.from_numpy(gains)


def start_from_ridge(model: nn.Module, inputs: Sequence[np.ndarray], alpha: float) -> None:
    """Set the gains of every level memory in ``model`` (each ensemble member's) to
    :func:`fit_gains` of the training stays ``inputs``."""
    gains = fit_gains(inputs, alpha)
    for m in model.modules():
        if isinstance(m, LevelMemory):
            with torch.no_grad():
                m.gain.copy_(gains / _GAIN_SCALE)


class LevelMemory(DynamicsModel):
    """``inner``'s forecast plus a fitted, per-variable pull towards the measured levels."""

    def __init__(self, cfg: ModelConfig, inner: DynamicsModel) -> None:
        super().__init__(cfg)
        self.inner = inner
        # Fitted in closed form (start_from_ridge), not trained: on ~50 patients, stopped early
        # on ~10, Adam left them short of the closed form (docs/results.md).
        self.gain = nn.Parameter(torch.zeros(len(HALF_LIVES) + 1, N_STATE), requires_grad=False)
        self._n_inner = len(inner.init_state(1, torch.device("cpu"), torch.float32))

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> State:
        return [*self.inner.init_state(batch, device, dtype), *empty_levels(batch, device, dtype)]

    def forward(self, x: Tensor) -> Tensor:
        # Teacher-forced: the network's own sequence forward (nn.GRU's fused loop, CfC's
        # hoisted projection) plus the pull, the same numbers as chaining ``step``.
        # The pull bin by bin, as ``step`` makes it: the gains' gradient sums in the same order.
        levels = measured_levels(x)
        pulls = [self._pull(levels[:, t], x[:, t]) for t in range(x.shape[1])]
        return self.inner(x) + torch.stack(pulls, dim=1)

    def _pull(self, levels: Tensor, x: Tensor) -> Tensor:
        return (_GAIN_SCALE * self.gain.to(x.dtype) * (levels - x[:, None, :N_STATE])).sum(dim=1)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        memory, levels = update_levels(state[self._n_inner :], x)
        y, inner_new = self.inner.step(x, state[: self._n_inner])
        return y + self._pull(levels, x), [*inner_new, *memory]
