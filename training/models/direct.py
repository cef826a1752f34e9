"""Direct multi-horizon ridge: predicts the change over K bins straight from bin t.

Not a dynamics model (it does not roll out): for each horizon K and variable v a ridge on v's
own compact design (docs/training.md, ``direct``). Other variables' states added little but
variance on the demo's ~60 training patients. A strong, cheap baseline: a dynamics model that
sees the whole history should do at least this well.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from features.catalog import N_STATE
from training.models.level import HALF_LIVES, measured_levels

ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))
N_HISTORY = len(HALF_LIVES) + 2  # EWMAs, running mean, bin index


def history_features(x: np.ndarray) -> np.ndarray:
    """(n, 18, N_HISTORY) summaries of each variable's history up to and including bin t: the
    measured levels of :mod:`training.models.level` (the networks' level memory, one
    definition) minus the state at t, and the bin index. Row t reads rows <= t only."""
    state = x[:, :N_STATE].astype(np.float64)
    levels = measured_levels(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()
    out = np.empty((len(x), N_STATE, N_HISTORY))
    out[:, :, :-1] = (levels - state[:, None, :]).transpose(0, 2, 1)
    out[:, :, -1] = np.arange(len(x))[:, None] / 10.0  # of the order of the other columns
    return out


def _features(inputs: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-variable design rows (W, 18, width) of every window (stay i, start s) with
    s + k <= n_i - 1, in the order of :func:`training.rollout.rollout_windows`; returns
    (X, stay index, start). ``X[w, v]`` is variable v's row; column 0 is its state at t."""
    n_iv = inputs[0].shape[1] - 2 * N_STATE if inputs else 0
    width = 2 + k * n_iv + N_HISTORY
    blocks, stay, start = [], [], []
    for i, x in enumerate(inputs):
        w = len(x) - k
        if w <= 0:
            continue
        iv = sliding_window_view(x[:-1, 2 * N_STATE :], k, axis=0)  # (w, n_iv, k)
        iv = iv.transpose(0, 2, 1).reshape(w, k * n_iv)  # bin t's first, then t+1, ...
        rows = np.empty((w, N_STATE, width))
        rows[:, :, 0] = x[:w, :N_STATE]
        rows[:, :, 1] = x[:w, N_STATE : 2 * N_STATE]
        rows[:, :, 2 : 2 + k * n_iv] = iv[:, None, :]
        rows[:, :, 2 + k * n_iv :] = history_features(x)[:w]
        blocks.append(rows)
        stay.append(np.full(w, i, dtype=np.int64))
        start.append(np.arange(w, dtype=np.int64))
    if not blocks:
        return np.zeros((0, N_STATE, width)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(blocks), np.concatenate(stay), np.concatenate(start)


class DirectRidge:
    """One ridge per (K, variable) on that variable's compact design, fitted on measured
    targets; predictions clipped to bounds.

    The penalty of each is chosen from ``alphas`` by patient-grouped cross-validation on the
    training windows only (windows of one patient are correlated: leave-one-window-out would
    pick too small a penalty); a large penalty shrinks towards persistence.
    """

    def __init__(self, alphas: tuple[float, ...] = ALPHAS) -> None:
        self.alphas = alphas
        self.coef: dict[int, np.ndarray] = {}  # K -> (18, width)
        self.intercept: dict[int, np.ndarray] = {}  # K -> (18,)

    def fit(
        self,
        inputs: list[np.ndarray],
        state: list[np.ndarray],
        ks: tuple[int, ...],
        groups: np.ndarray | None = None,
    ) -> DirectRidge:
        """``groups[i]``: the patient of stay i (default: each stay its own patient)."""
        from sklearn.linear_model import Ridge
        from sklearn.model_selection import GridSearchCV, GroupKFold

        groups = np.arange(len(inputs)) if groups is None else np.asarray(groups)
        for k in ks:
            x, stay, start = _features(inputs, k)
            coef = np.zeros((N_STATE, x.shape[2]))
            icpt = np.zeros(N_STATE)
            if len(x):
                pairs = list(zip(stay, start, strict=True))
                target = np.stack([state[i][s + k] - state[i][s] for i, s in pairs])
                measured = np.stack([inputs[i][s + k, N_STATE : 2 * N_STATE] > 0 for i, s in pairs])
                g = groups[stay]
                for v in range(N_STATE):
                    m = measured[:, v]
                    n_groups = len(np.unique(g[m]))
                    if n_groups >= 3 and len(self.alphas) > 1:
                        search = GridSearchCV(
                            Ridge(),
                            {"alpha": list(self.alphas)},
                            cv=GroupKFold(n_splits=min(5, n_groups)),
                            scoring="neg_mean_squared_error",
                        ).fit(x[m, v], target[m, v], groups=g[m])
                        r = search.best_estimator_
                    elif m.sum() >= 2:
                        r = Ridge(alpha=self.alphas[-1]).fit(x[m, v], target[m, v])
                    else:
                        continue
                    coef[v], icpt[v] = r.coef_, r.intercept_
            self.coef[k], self.intercept[k] = coef, icpt
        return self

    def predict(
        self,
        inputs: list[np.ndarray],
        k: int,
        bounds: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scaled state at t+K for every window; returns (pred (W, 18), stay, start)."""
        x, stay, start = _features(inputs, k)
        pred = x[:, :, 0] + np.einsum("wvf,vf->wv", x, self.coef[k]) + self.intercept[k]
        if bounds is not None:
            pred = np.clip(pred, bounds[0], bounds[1])
        return pred, stay, start
