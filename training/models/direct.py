"""Direct multi-horizon ridge: predicts the change over K bins straight from bin t.

Not a dynamics model (it does not roll out): for each horizon K and variable v a ridge on v's
own compact design (docs/training.md, ``direct``). Other variables' states added little but
variance on the demo's ~60 training patients. A strong, cheap baseline, and the direct half
of the networks' served forecast (``--direct-weight``, docs/training.md): its coefficients are
fitted in closed form and saved with the model like the level gains.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from features.catalog import N_INTERVENTION, N_STATE
from training.models.level import HALF_LIVES, measured_levels

ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))
N_HISTORY = len(HALF_LIVES) + 2  # EWMAs, running mean, bin index
Bounds = tuple[Tensor, Tensor]


def width(k: int) -> int:
    """Columns of a K-step design row: state, mask, K bins of interventions, history."""
    return 2 + k * N_INTERVENTION + N_HISTORY


def anchors(lengths: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(stay, start) of every window with start + k <= n - 1, stay by stay, in the order of
    :func:`training.rollout.rollout_windows`."""
    t = int(lengths.max()) if len(lengths) else 0
    live = torch.arange(t)[None] <= (lengths[:, None] - 1 - k)
    return live.nonzero(as_tuple=True)


def design(x: Tensor, levels: Tensor, rows: Tensor, starts: Tensor, iv: Tensor, k: int) -> Tensor:
    """Per-variable design rows (W, 18, :func:`width`) of the windows starting at bin
    ``starts`` of padded inputs ``x`` (B, T, 39), ``levels`` = ``measured_levels(x)``, ``iv``
    (W, >= k, 3) the interventions of bins t..t+k-1. Row ``[w, v]`` reads v's state and mask at
    t, the interventions (bin t's first), v's measured levels minus its state at t and the
    bin index: nothing after bin t but the interventions."""
    s = x[rows, starts, :N_STATE]
    m = x[rows, starts, N_STATE : 2 * N_STATE]
    w = len(rows)
    hist = (levels[rows, starts] - s[:, None]).transpose(1, 2)  # (W, 18, len(HALF_LIVES) + 1)
    index = (starts.to(x.dtype) / 10.0).view(w, 1, 1).expand(w, N_STATE, 1)  # order of the rest
    cols = [s[..., None], m[..., None], iv[:, :k].reshape(w, 1, -1).expand(w, N_STATE, -1)]
    return torch.cat([*cols, hist, index], dim=-1)


class DirectRidge(nn.Module):
    """One ridge per (K <= ``horizon``, variable) on that variable's compact design, fitted on
    measured targets; forecasts clipped to bounds. Horizons never fitted forecast no change.

    The penalty of each is chosen from ``alphas`` by patient-grouped cross-validation on the
    training windows only (windows of one patient are correlated: leave-one-window-out would
    pick too small a penalty); a large penalty shrinks towards persistence. The coefficients
    are parameters that no optimiser moves, so they are saved and counted with the model.
    """

    def __init__(self, horizon: int = 5, alphas: tuple[float, ...] = ALPHAS) -> None:
        super().__init__()
        self.alphas = alphas
        self.coef = nn.ParameterList(
            nn.Parameter(torch.zeros(N_STATE, width(k), dtype=torch.float64), requires_grad=False)
            for k in range(1, horizon + 1)
        )
        self.intercept = nn.Parameter(
            torch.zeros(horizon, N_STATE, dtype=torch.float64), requires_grad=False
        )

    @property
    def horizon(self) -> int:
        return len(self.coef)

    def fit(
        self,
        inputs: list[np.ndarray],
        state: list[np.ndarray],
        ks: tuple[int, ...] | None = None,
        groups: np.ndarray | None = None,
    ) -> DirectRidge:
        """Fit horizons ``ks`` (default 1..horizon) on stays ``inputs`` (n, 39) with scaled
        filled ``state`` (n, 18); ``groups[i]``: the patient of stay i (default: each stay its
        own patient)."""
        from sklearn.linear_model import Ridge

        ks = tuple(range(1, self.horizon + 1)) if ks is None else ks
        if any(not 1 <= k <= self.horizon for k in ks):
            raise ValueError(f"horizons must be in 1..{self.horizon}, got {ks}")
        if not inputs:
            return self
        groups = np.arange(len(inputs)) if groups is None else np.asarray(groups)
        x, lengths = _padded(inputs)
        levels = measured_levels(x)
        truth = _padded(state)[0]
        for k in ks:
            rows, starts = anchors(lengths, k)
            coef = np.zeros((N_STATE, width(k)))
            icpt = np.zeros(N_STATE)
            if len(rows):
                iv = interventions_from(x, rows, starts, k)
                d = design(x, levels, rows, starts, iv, k).numpy()
                target = (truth[rows, starts + k] - truth[rows, starts]).numpy()
                measured = (x[rows, starts + k, N_STATE : 2 * N_STATE] > 0).numpy()
                g = groups[rows.numpy()]
                for v in range(N_STATE):
                    m = measured[:, v]
                    n_groups = len(np.unique(g[m]))
                    if n_groups >= 3 and len(self.alphas) > 1:
                        alpha = grouped_cv_alpha(d[m, v], target[m, v], g[m], self.alphas)
                    elif m.sum() >= 2:
                        alpha = self.alphas[-1]
                    else:
                        continue
                    r = Ridge(alpha=alpha).fit(d[m, v], target[m, v])
                    coef[v], icpt[v] = r.coef_, r.intercept_
            with torch.no_grad():
                self.coef[k - 1].copy_(torch.from_numpy(coef))
                self.intercept[k - 1].copy_(torch.from_numpy(icpt))
        return self

    def forecast(
        self, x: Tensor, rows: Tensor, starts: Tensor, iv: Tensor, bounds: Bounds | None = None
    ) -> Tensor:
        """Scaled state at t+1..t+K' (W, K', 18), K' = min(K, horizon), from bin ``starts``
        of rows ``rows`` of padded inputs ``x`` (B, T, 39); ``iv`` (W, K, 3) the interventions
        of bins t..t+K-1."""
        last = min(iv.shape[1], self.horizon)
        # One design for the longest horizon; horizon k's is its first k bins of interventions.
        full = design(x, measured_levels(x), rows, starts, iv, last)
        out = []
        for k in range(1, last + 1):
            d = torch.cat([full[..., : width(k) - N_HISTORY], full[..., -N_HISTORY:]], dim=-1)
            coef, icpt = self.coef[k - 1].to(x.dtype), self.intercept[k - 1].to(x.dtype)
            y = d[:, :, 0] + torch.einsum("wvf,vf->wv", d, coef) + icpt
            out.append(y if bounds is None else torch.clamp(y, bounds[0], bounds[1]))
        return torch.stack(out, dim=1) if out else x.new_zeros(len(rows), 0, N_STATE)

    @torch.no_grad()
    def predict(
        self, inputs: list[np.ndarray], k: int, bounds: tuple[np.ndarray, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scaled state at t+K of every window of stays ``inputs``, in rollout order:
        (pred (W, 18), stay, start)."""
        if not inputs:
            return np.zeros((0, N_STATE)), np.zeros(0, np.int64), np.zeros(0, np.int64)
        x, lengths = _padded(inputs)
        rows, starts = anchors(lengths, k)
        b = None if bounds is None else tuple(torch.as_tensor(a, dtype=x.dtype) for a in bounds)
        pred = self.forecast(x, rows, starts, interventions_from(x, rows, starts, k), b)[:, k - 1]
        return pred.numpy(), rows.numpy(), starts.numpy()


def grouped_cv_alpha(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, alphas: tuple[float, ...]
) -> float:
    """The penalty of ``alphas`` with the least mean squared error over a ``GroupKFold`` (up
    to 5 folds) of ``Ridge`` fits with an intercept: what ``GridSearchCV(Ridge(), ...)`` with
    ``neg_mean_squared_error`` chooses (first of ties), found with one ``ridge_regression``
    call per fold for all penalties (one target column per penalty) instead of one fit each:
    a search over 180 (K, variable) designs took 20 s, most of it per-fit overhead."""
    from sklearn.linear_model import ridge_regression
    from sklearn.model_selection import GroupKFold

    a = np.asarray(alphas, dtype=np.float64)
    folds = GroupKFold(n_splits=min(5, len(np.unique(groups))))
    mse = np.zeros(len(a))
    for train, test in folds.split(x, y, groups):
        xm, ym = x[train].mean(axis=0), y[train].mean()
        targets = np.repeat((y[train] - ym)[:, None], len(a), axis=1)
        coef = ridge_regression(x[train] - xm, targets, a, solver="cholesky")  # (alphas, p)
        pred = (x[test] - xm) @ coef.T + ym
        mse += ((pred - y[test][:, None]) ** 2).mean(axis=0)
    return float(a[int(np.argmin(mse))])


def _padded(arrays: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    t = pad_sequence([torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in arrays], True)
    return t, torch.tensor([len(a) for a in arrays], dtype=torch.int64)


def interventions_from(x: Tensor, rows: Tensor, starts: Tensor, k: int) -> Tensor:
    """The interventions of bins t..t+k-1 of every window (W, k, 3) of padded inputs ``x``;
    bins past the padding read its last bin (callers mask those steps)."""
    bins = (starts[:, None] + torch.arange(k, device=x.device)).clamp_max(x.shape[1] - 1)
    return x[rows[:, None], bins, 2 * N_STATE :]
