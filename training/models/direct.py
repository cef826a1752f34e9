"""Direct multi-horizon ridge: predicts the change over K bins straight from bin t.

Not a dynamics model (it does not roll out): for each horizon K and variable it regresses
``state[t+K] - state[t]`` on bin t's 39 inputs and the interventions of bins t+1..t+K-1, on
training windows whose target was measured. A strong, cheap baseline: a dynamics model that
sees the whole history should do at least this well.
"""

from __future__ import annotations

import numpy as np

from features.catalog import N_STATE


def _features(inputs: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Design rows of every window (stay i, start s) with s + k <= n_i - 1, in the order of
    :func:`training.rollout.rollout_windows`; returns (X, stay index, start)."""
    rows, stay, start = [], [], []
    for i, x in enumerate(inputs):
        for s in range(len(x) - k):
            future_iv = x[s + 1 : s + k, 2 * N_STATE :].reshape(-1)
            rows.append(np.concatenate([x[s], future_iv]))
            stay.append(i)
            start.append(s)
    width = inputs[0].shape[1] + (k - 1) * (inputs[0].shape[1] - 2 * N_STATE) if inputs else 0
    x = np.asarray(rows, dtype=np.float64).reshape(-1, width)
    return x, np.asarray(stay, dtype=np.int64), np.asarray(start, dtype=np.int64)


ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))


class DirectRidge:
    """One ridge per (K, variable), fitted on measured targets; predictions clipped to bounds.

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
            coef = np.zeros((N_STATE, x.shape[1]))
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
                        ).fit(x[m], target[m, v], groups=g[m])
                        r = search.best_estimator_
                    elif m.sum() >= 2:
                        r = Ridge(alpha=self.alphas[-1]).fit(x[m], target[m, v])
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
        pred = x[:, :N_STATE] + x @ self.coef[k].T + self.intercept[k]
        if bounds is not None:
            pred = np.clip(pred, bounds[0], bounds[1])
        return pred, stay, start
