"""Split-conformal prediction intervals for closed-loop rollouts (method: docs/intervals.md).

Per (forecast step, variable), the sorted nonconformity scores of the validation stays'
measured values are kept, so any level can be asked for at forecast time; a level the
calibration cannot support gives the whole clamp range (honest, if useless). Whether a
variable's scores are normalised by its recent variability (``adaptive``) is decided on the
calibration stays alone, never on test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from features.catalog import N_STATE, STATE_NAMES
from features.preprocess import CLAMP_HIGH, CLAMP_LOW

DEFAULT_LEVELS: tuple[float, ...] = (0.8, 0.95)
LOOKBACK = 4  # history bins (2 days) for the difficulty estimate
FORMAT_VERSION = 1
QUANTILE_CACHE = 16  # level sets whose quantile tables a Calibration keeps


def level_label(level: float) -> str:
    """``0.8`` -> ``"0.8"`` (metric names and the service's response keys)."""
    return f"{level:g}"


def check_levels(levels: Sequence[float]) -> None:
    """ValueError naming the first level outside (0, 1)."""
    for level in levels:
        if not 0.0 < level < 1.0:
            raise ValueError(f"interval level must be in (0, 1), got {level}")


@dataclass(frozen=True)
class ScoreTable:
    """The weighted conformal quantiles of many rows (steps x variables) in one search.

    Row r's cumulative weights, divided by the row's total, lie in (0, 1]; shifted by 2r they
    are increasing over all rows, so a single ``searchsorted`` finds every row's quantile at
    every level at once (the service asks for a few levels over 5 x 18 rows per call).
    """

    scores: np.ndarray  # all rows' sorted scores, row after row
    keys: np.ndarray  # cumulative weight / row total + 2 * row
    start: np.ndarray  # (R,) first index of each row
    n: np.ndarray  # (R,) scores per row

    @classmethod
    def build(
        cls, sorted_scores: Sequence[np.ndarray], cum_weights: Sequence[np.ndarray]
    ) -> ScoreTable:
        n = np.array([len(s) for s in sorted_scores], dtype=np.int64)
        keys = [
            np.asarray(c, dtype=np.float64) / c[-1] + 2.0 * r if len(c) else np.zeros(0)
            for r, c in enumerate(cum_weights)
        ]
        return cls(
            np.concatenate(
                [np.asarray(s, dtype=np.float64) for s in sorted_scores] or [np.zeros(0)]
            ),
            np.concatenate(keys or [np.zeros(0)]),
            np.cumsum(n) - n,
            n,
        )

    def quantiles(self, levels: Sequence[float]) -> np.ndarray:
        """(len(levels), R): per row, the smallest score whose cumulative weight reaches
        ``level * (total + total / n)`` (the test point weighs a mean weight); ``inf`` where
        the row cannot support the level."""
        check_levels(levels)
        lv = np.asarray(levels, dtype=np.float64)[:, None]
        n = np.maximum(self.n, 1)
        # 1e-9: a cumulative weight equal to the target up to rounding reaches it
        target = (lv - 1e-9) * (n + 1) / n + 2.0 * np.arange(len(n))
        i = np.searchsorted(self.keys, target, side="left") - self.start
        ok = (self.n > 0) & (i < self.n)
        if not len(self.scores):
            return np.full(target.shape, math.inf)
        picked = self.scores[np.minimum(self.start + np.clip(i, 0, None), len(self.scores) - 1)]
        return np.where(ok, picked, math.inf)


def recent_variability(window: np.ndarray) -> np.ndarray:
    """Mean absolute change between successive measured values, per row and variable.

    ``window`` (N, L, 18): the last L history bins (physical units, NaN = not measured, rows
    shorter than L padded with NaN in front). Values are clamped to the plausible range first,
    so one unit error cannot blow a band up. Gaps are bridged (a change between two measured
    values with unmeasured bins between counts once); fewer than two measured values give 0.
    """
    # maximum/minimum rather than np.clip: the same result (NaN stays NaN), a quarter of the
    # time with per-variable bounds.
    v = np.minimum(np.maximum(np.asarray(window, dtype=np.float64), CLAMP_LOW), CLAMP_HIGH)
    # A loop over the few lookback bins, each over all rows and variables: measured faster
    # than a loop-free version (a running "last measured" index and a gather).
    prev = np.full(v.shape[::2], np.nan)
    total = np.zeros(prev.shape)
    count = np.zeros(prev.shape)
    for t in range(v.shape[1]):
        cur = v[:, t]
        both = ~np.isnan(cur) & ~np.isnan(prev)
        total += np.where(both, np.abs(cur - prev), 0.0)
        count += both
        prev = np.where(np.isnan(cur), prev, cur)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def history_windows(state: np.ndarray, lengths: np.ndarray, lookback: int = LOOKBACK) -> np.ndarray:
    """The last ``lookback`` bins of each padded history (B, T, 18) -> (B, lookback, 18)."""
    state = np.asarray(state, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.int64)
    idx = lengths[:, None] - lookback + np.arange(lookback)  # (B, L), negative = before bin 0
    rows = np.arange(len(lengths))[:, None]
    out = state[rows, np.clip(idx, 0, None)]
    out[idx < 0] = np.nan
    return out


def stay_windows(
    raw_state: Sequence[np.ndarray], stay: np.ndarray, start: np.ndarray, lookback: int = LOOKBACK
) -> np.ndarray:
    """:func:`history_windows` for rollouts from bin ``start`` of stay ``stay`` (offline)."""
    flat = np.concatenate([*raw_state, np.full((1, N_STATE), np.nan)])  # last: before bin 0
    first = np.cumsum([0, *map(len, raw_state)])[np.asarray(stay, dtype=np.int64)]
    idx = np.asarray(start)[:, None] + 1 - lookback + np.arange(lookback)
    return flat[np.where(idx >= 0, first[:, None] + idx, -1)]


@dataclass
class Calibration:
    """Sorted nonconformity scores per forecast step and variable, and how to scale them.

    ``scores[h][j]``: step h + 1, variable j, ascending; ``cum_weights[h][j]`` their cumulative
    weights (each stay's windows weigh 1 in all, so a few long stays do not dominate).
    ``adaptive[j]``: scores of variable j are ``|residual| / (recent_variability + floor[j])``;
    otherwise plain ``|residual|``. Steps after ``horizon`` reuse the last step's scores: they
    are not calibrated.
    """

    scores: list[list[np.ndarray]]
    cum_weights: list[list[np.ndarray]]
    adaptive: np.ndarray
    floor: np.ndarray
    lookback: int = LOOKBACK
    levels: tuple[float, ...] = DEFAULT_LEVELS
    info: dict = field(default_factory=dict)
    _table: ScoreTable | None = field(default=None, init=False, repr=False, compare=False)
    _cache: dict[tuple[float, ...], np.ndarray] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def horizon(self) -> int:
        return len(self.scores)

    def quantile_table(self, levels: Sequence[float]) -> np.ndarray:
        """(len(levels), H, 18) score quantiles, all in one search (read-only).

        The last few level sets asked for are kept (the search costs more than the rest of a
        small batch's band); the cache is bounded because clients may send any level.
        """
        key = tuple(float(lv) for lv in levels)
        q = self._cache.get(key)
        if q is None:
            if self._table is None:
                self._table = ScoreTable.build(
                    [s for step in self.scores for s in step],
                    [c for step in self.cum_weights for c in step],
                )
            q = self._table.quantiles(key).reshape(len(key), self.horizon, N_STATE)
            q.setflags(write=False)
            if len(self._cache) >= QUANTILE_CACHE:
                self._cache.clear()  # atomic: safe with the service's model threads
            self._cache[key] = q
        return q

    def intervals(
        self, pred: np.ndarray, window: np.ndarray, levels: Sequence[float]
    ) -> dict[float, tuple[np.ndarray, np.ndarray]]:
        """``{level: (lower, upper)}``, each (N, H', 18) physical, around ``pred`` (N, H', 18).

        ``window`` (N, lookback, 18): the histories' last bins (:func:`history_windows`).
        """
        levels = [float(lv) for lv in levels]
        if not levels:
            return {}
        pred = np.asarray(pred, dtype=np.float64)
        steps = np.minimum(np.arange(pred.shape[1]), self.horizon - 1)
        table = self.quantile_table(levels)[:, steps]  # (L, H', 18), one search
        scale = np.where(self.adaptive, recent_variability(window) + self.floor, 1.0)[:, None]
        out = {}
        # Per level over all rows, steps and variables: measured faster than one (L, N, H', 18)
        # broadcast.
        for level, q in zip(levels, table, strict=True):
            half = q[None] * scale
            out[level] = (np.maximum(pred - half, CLAMP_LOW), np.minimum(pred + half, CLAMP_HIGH))
        return out

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "variables": list(STATE_NAMES),
            "lookback": self.lookback,
            "levels": list(self.levels),
            "adaptive": [bool(a) for a in self.adaptive],
            "floor": [float(f) for f in self.floor],
            "scores": [[s.tolist() for s in step] for step in self.scores],
            "cum_weights": [[c.tolist() for c in step] for step in self.cum_weights],
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"calibration format {d.get('format_version')!r} not supported")
        if list(d["variables"]) != list(STATE_NAMES):
            raise ValueError("calibration variables differ from this code's catalog")
        return cls(
            scores=[[np.asarray(s, dtype=np.float64) for s in step] for step in d["scores"]],
            cum_weights=[
                [np.asarray(c, dtype=np.float64) for c in step] for step in d["cum_weights"]
            ],
            adaptive=np.asarray(d["adaptive"], dtype=bool),
            floor=np.asarray(d["floor"], dtype=np.float64),
            lookback=int(d["lookback"]),
            levels=tuple(float(x) for x in d["levels"]),
            info=dict(d.get("info", {})),
        )


@dataclass
class Residuals:
    """Calibration material of step h: |residual| (N, 18) physical, NaN where the truth was not
    measured; the recent variability of each window's history (N, 18); each window's group
    (stay) for the two-fold choice of ``adaptive``."""

    abs_err: np.ndarray
    variability: np.ndarray
    group: np.ndarray


def fit_calibration(
    residuals: list[Residuals],
    levels: tuple[float, ...] = DEFAULT_LEVELS,
    adaptive: str = "auto",
) -> Calibration:
    """Calibrate from the residuals of steps 1..H (``residuals[h - 1]``).

    ``adaptive``: ``"auto"`` (per variable, two-fold on the groups) or ``"never"``.
    """
    if adaptive not in ("auto", "never"):
        raise ValueError(f"adaptive must be auto or never, got {adaptive!r}")
    floor = _floor(residuals)
    chosen = np.zeros(N_STATE, dtype=bool)
    if adaptive == "auto":
        chosen = _choose_adaptive(residuals, floor, levels)
    scored = [_scores(r, chosen, floor) for r in residuals]
    scores = [[s for s, _ in step] for step in scored]
    cum = [[c for _, c in step] for step in scored]
    info = {
        "n_scores": [[int(len(s)) for s in step] for step in scores],
        "n_groups": int(len(np.unique(np.concatenate([r.group for r in residuals])))),
    }
    return Calibration(scores, cum, chosen, floor, LOOKBACK, tuple(levels), info)


def _floor(residuals: list[Residuals]) -> np.ndarray:
    """Per variable: the mean recent variability over the calibration windows (so a history
    with no measured change still gets a typical band); 1 where it is 0 (then adaptive is the
    same as absolute)."""
    d = np.concatenate([r.variability for r in residuals])
    f = d.mean(axis=0) if len(d) else np.zeros(N_STATE)
    return np.where(f > 0, f, 1.0)


def _scores(
    r: Residuals, adaptive: np.ndarray, floor: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per variable: sorted scores of the measured values and their cumulative weights, each
    group's values weighing 1 in all."""
    scale = np.where(adaptive, r.variability + floor, 1.0)
    s = r.abs_err / scale
    out = []
    for j in range(N_STATE):
        m = ~np.isnan(s[:, j])
        _, inv, counts = np.unique(r.group[m], return_inverse=True, return_counts=True)
        w = 1.0 / counts[inv]
        order = np.argsort(s[m, j], kind="stable")
        out.append((s[m, j][order], np.cumsum(w[order])))
    return out


def _choose_adaptive(
    residuals: list[Residuals], floor: np.ndarray, levels: tuple[float, ...]
) -> np.ndarray:
    """Adaptive for variable j when, calibrated on one half of the groups, its mean interval
    width on the other half (both ways round, all steps and levels) is smaller than the
    absolute score's. Needs no data beyond the calibration set."""
    groups = np.unique(np.concatenate([r.group for r in residuals]))
    if len(groups) < 4:
        return np.zeros(N_STATE, dtype=bool)
    fold_of = {g: i % 2 for i, g in enumerate(groups)}
    width = {False: np.zeros(N_STATE), True: np.zeros(N_STATE)}
    for mode in (False, True):
        flags = np.full(N_STATE, mode)
        for r in residuals:
            fold = np.array([fold_of[g] for g in r.group], dtype=int)
            for a in (0, 1):
                cal, ev = fold == a, fold != a
                half = Residuals(r.abs_err[cal], r.variability[cal], r.group[cal])
                scores = _scores(half, flags, floor)
                table = ScoreTable.build([s for s, _ in scores], [c for _, c in scores])
                scale = np.where(flags, r.variability[ev] + floor, 1.0)
                measured = ~np.isnan(r.abs_err[ev])
                for q in table.quantiles(levels):
                    # A level the half cannot support counts as no width for both modes.
                    w = np.where(measured & np.isfinite(q), 2 * q * scale, 0.0)
                    n = np.maximum(measured.sum(axis=0), 1)
                    width[mode] += w.sum(axis=0) / n
    return width[True] < width[False]
