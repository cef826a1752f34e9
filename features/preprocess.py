"""Preprocessing shared by the ETL (offline) and the service (online).

The order is fixed and the same everywhere:

1. values outside a variable's drop range become missing (done on events, before binning);
2. bins are aggregated (``features.binning``);
3. aggregated state values are clamped to the plausible range;
4. ``<var>_observed`` records what was measured in the bin, before any filling;
5. state variables are forward-filled within a stay only (never across stays);
6. absent interventions are zero;
7. what is still missing is imputed row by row (IterativeImputer + BayesianRidge fitted on the
   training patients of the split or fold). Each row is imputed from its own bin only, so no
   value from a later bin can reach an earlier one: this is a forecaster, MIMIC-Extract's
   stay-mean fill leaks the future;
8. min-max scaling (fitted on the same training patients) maps to the model's space.

Steps 1-6 are the ETL's (its ``bins.parquet`` keeps NaN where step 5 found nothing to carry);
steps 7-8 live in :class:`Preprocessor`, the versioned artifact fitted by training on its
training patients, saved with the model and loaded by the service.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from features.atomic import atomic_dir
from features.catalog import (
    INTERVENTION_BY_NAME,
    INTERVENTION_NAMES,
    N_STATE,
    OBSERVED_NAMES,
    STATE_NAMES,
    STATE_VARIABLES,
    catalog_dict,
    catalog_version,
)
from features.errors import UserError

PREPROCESSOR_FORMAT = 1
IMPUTER_MAX_ITER = 10
IMPUTER_MAX_ROWS = 200_000
"""Very large training sets are subsampled to this for the imputer fit only; the scaler always
sees every training row."""
FEATURE_NAMES: tuple[str, ...] = STATE_NAMES + INTERVENTION_NAMES
BINS_COLUMNS: tuple[str, ...] = (
    "subject_id",
    "hadm_id",
    "icustay_id",
    "bin",
    "bin_start",
    "split",
    *STATE_NAMES,
    *INTERVENTION_NAMES,
    *OBSERVED_NAMES,
)
"""The columns of ``bins.parquet``, in order (the ETL output contract, docs/architecture.md)."""

CLAMP_LOW, CLAMP_HIGH = np.array([v.clamp for v in STATE_VARIABLES], dtype=np.float64).T
DROP_LOW, DROP_HIGH = np.array([v.drop for v in STATE_VARIABLES], dtype=np.float64).T
INTERVENTION_MAX = np.array([INTERVENTION_BY_NAME[n].max_value for n in INTERVENTION_NAMES])
# Bounds of ``[state, interventions]``: the imputer never leaves them.
FEATURE_LOW = np.concatenate([CLAMP_LOW, np.zeros(len(INTERVENTION_NAMES))])
FEATURE_HIGH = np.concatenate([CLAMP_HIGH, INTERVENTION_MAX])


class PreprocessorError(UserError):
    """A preprocessor artifact that is missing, corrupt or built for another catalog."""


def forward_fill(values: np.ndarray, group_start: np.ndarray) -> np.ndarray:
    """Forward-fill NaNs down the rows of ``values`` (n, k), never across groups.

    ``group_start[i]`` is the first row of row i's group (its stay).
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    rows = np.arange(n)[:, None]
    last_valid = np.where(np.isnan(values), -1, rows)
    np.maximum.accumulate(last_valid, axis=0, out=last_valid)
    usable = last_valid >= group_start[:, None]
    cols = np.broadcast_to(np.arange(values.shape[1]), values.shape)
    filled = values[np.where(usable, last_valid, 0), cols]
    return np.where(usable, filled, np.nan)


@dataclass
class PreparedBins:
    """State after clamp + forward-fill (NaN where nothing is known yet), masks, interventions."""

    state: np.ndarray  # (n, 18) physical units
    observed: np.ndarray  # (n, 18) 1.0 where measured in that bin
    interventions: np.ndarray  # (n, 3) physical units, zero where absent


def prepare_arrays(
    state: np.ndarray, interventions: np.ndarray, group_start: np.ndarray
) -> PreparedBins:
    """Steps 3-6 on aggregated bins, as arrays: clamp, observed masks, ffill, zero-fill.

    ``state`` (n, 18) and ``interventions`` (n, 3) hold bin aggregates in physical units with
    NaN where nothing was charted, rows ordered by bin within each group (stay). This is the one
    implementation used by the ETL (all stays at once) and by the service (one history).
    """
    state = np.asarray(state, dtype=np.float64)
    interventions = np.asarray(interventions, dtype=np.float64)
    if state.ndim != 2 or state.shape[1] != N_STATE:
        raise ValueError(f"state must be (n, {N_STATE}), got {state.shape}")
    if interventions.shape != (state.shape[0], len(INTERVENTION_NAMES)):
        raise ValueError(
            f"interventions must be (n, {len(INTERVENTION_NAMES)}), got {interventions.shape}"
        )
    observed = (~np.isnan(state)).astype(np.float32)
    filled = forward_fill(np.clip(state, CLAMP_LOW, CLAMP_HIGH), group_start)
    iv = np.clip(np.nan_to_num(interventions, nan=0.0), 0.0, INTERVENTION_MAX)
    return PreparedBins(filled, observed, iv)


def group_starts(stay_ids: np.ndarray) -> np.ndarray:
    """For rows sorted by stay, the index of the first row of each row's stay."""
    stay_ids = np.asarray(stay_ids)
    # The slice keeps no row when there are none (the leading True is row 0's).
    is_start = np.concatenate([[True], stay_ids[1:] != stay_ids[:-1]])[: len(stay_ids)]
    return np.maximum.accumulate(np.where(is_start, np.arange(len(stay_ids)), 0))


def prepare_bins(frame: pd.DataFrame) -> pd.DataFrame:
    """:func:`prepare_arrays` on a frame of aggregated bins, one row per (icustay_id, bin);
    returned sorted by (icustay_id, bin), with the ``<var>_observed`` masks added."""
    for col in ("icustay_id", "bin", *STATE_NAMES):
        if col not in frame:
            raise KeyError(f"prepare_bins: column {col!r} missing")
    out = frame.sort_values(["icustay_id", "bin"], kind="stable").reset_index(drop=True)
    prepared = prepare_arrays(
        out[list(STATE_NAMES)].to_numpy(np.float64),
        out.reindex(columns=list(INTERVENTION_NAMES)).to_numpy(np.float64),  # absent: NaN
        group_starts(out["icustay_id"].to_numpy()),
    )
    out[list(STATE_NAMES)] = prepared.state
    out[list(INTERVENTION_NAMES)] = prepared.interventions
    out[list(OBSERVED_NAMES)] = prepared.observed
    return out


@dataclass
class _LinearStep:
    """One step of IterativeImputer's round-robin, as the linear map BayesianRidge learned."""

    feature: int
    neighbors: np.ndarray
    coef: np.ndarray
    intercept: float

    def __post_init__(self) -> None:
        self.feature, self.intercept = int(self.feature), float(self.intercept)
        self.neighbors = np.asarray(self.neighbors, dtype=np.int64)
        self.coef = np.asarray(self.coef, dtype=np.float64)


class Preprocessor:
    """Fitted imputation and min-max scaling: the one artifact training and serving share.

    Imputation is scikit-learn's ``IterativeImputer(estimator=BayesianRidge())`` fitted on the
    training split. At transform time its round-robin of BayesianRidge predictions is replayed
    as plain linear maps (BayesianRidge predicts ``X @ coef_ + intercept_``), which gives the
    same numbers as ``IterativeImputer.transform`` (tested) at a fraction of the per-call cost,
    so the service can impute one patient in microseconds.
    """

    def __init__(
        self,
        initial_fill: np.ndarray,
        steps: list[_LinearStep],
        scale_min: np.ndarray,
        scale_max: np.ndarray,
        meta: dict | None = None,
    ) -> None:
        self.initial_fill = np.asarray(initial_fill, dtype=np.float64)
        self.steps = steps
        self.scale_min = np.asarray(scale_min, dtype=np.float64)
        self.scale_max = np.asarray(scale_max, dtype=np.float64)
        self.meta = dict(meta or {})
        span = self.scale_max - self.scale_min
        # A constant column (e.g. an intervention never given in training) scales to 0.
        self._span = np.where(span > 0, span, 1.0)

    @classmethod
    def fit(cls, train: pd.DataFrame, *, seed: int = 0) -> tuple[Preprocessor, object]:
        """Fit on prepared training bins (state may hold NaN; interventions are complete).

        Returns the preprocessor and the fitted sklearn imputer (kept for reference and tests).
        """
        from sklearn.experimental import enable_iterative_imputer  # noqa: F401
        from sklearn.impute import IterativeImputer
        from sklearn.linear_model import BayesianRidge

        x = train[list(FEATURE_NAMES)].to_numpy(np.float64, copy=True)
        if len(x) == 0:
            raise ValueError("cannot fit the preprocessor on an empty training split")
        fit_x = x
        if len(x) > IMPUTER_MAX_ROWS:
            rng = np.random.default_rng(seed)
            fit_x = x[np.sort(rng.choice(len(x), size=IMPUTER_MAX_ROWS, replace=False))]
        imputer = IterativeImputer(
            estimator=BayesianRidge(),
            max_iter=IMPUTER_MAX_ITER,
            random_state=seed,
            min_value=FEATURE_LOW,
            max_value=FEATURE_HIGH,
            keep_empty_features=True,
            skip_complete=True,
        )
        from threadpoolctl import threadpool_limits

        # BayesianRidge runs one small SVD per feature and round: multi-threaded BLAS only adds
        # contention there (100x slower on a busy 2-core machine than one thread).
        with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
            # Convergence warnings on tiny data are expected and harmless here.
            warnings.simplefilter("ignore")
            imputer.fit(fit_x)
        initial = np.asarray(imputer.initial_imputer_.statistics_, dtype=np.float64)
        # A variable never observed in training has no mean: fall back to its clamp midpoint.
        initial = np.where(np.isfinite(initial), initial, (FEATURE_LOW + FEATURE_HIGH) / 2)
        steps = [
            _LinearStep(t.feat_idx, t.neighbor_feat_idx, t.estimator.coef_, t.estimator.intercept_)
            for t in imputer.imputation_sequence_
        ]
        unscaled = cls(initial, steps, np.zeros(len(FEATURE_NAMES)), np.ones(len(FEATURE_NAMES)))
        filled = unscaled.impute(x)
        meta = {
            "format": PREPROCESSOR_FORMAT,
            "catalog_version": catalog_version(),
            "n_train_rows": int(len(x)),
            "n_fit_rows": int(len(fit_x)),
            "max_iter": IMPUTER_MAX_ITER,
            "n_iter": int(imputer.n_iter_),
            "seed": seed,
            "feature_names": list(FEATURE_NAMES),
        }
        return cls(initial, steps, filled.min(axis=0), filled.max(axis=0), meta), imputer

    def impute(self, x: np.ndarray) -> np.ndarray:
        """Impute NaNs in rows of ``[state(18), interventions(3)]`` in physical units.

        Row-independent: the result for a row depends on that row alone.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(FEATURE_NAMES):
            raise ValueError(f"impute expects (n, {len(FEATURE_NAMES)}), got {x.shape}")
        missing = np.isnan(x)
        if not missing.any():
            return x.copy()
        xt = np.where(missing, self.initial_fill, x)
        rows_missing = missing.any(axis=0)
        for step in self.steps:
            f = step.feature
            if not rows_missing[f]:
                continue
            m = missing[:, f]
            pred = xt[m][:, step.neighbors] @ step.coef + step.intercept
            xt[m, f] = np.clip(pred, FEATURE_LOW[f], FEATURE_HIGH[f])
        return xt

    def scale_state(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.scale_min[:N_STATE]) / self._span[:N_STATE]

    def unscale_state(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) * self._span[:N_STATE] + self.scale_min[:N_STATE]

    def scale_interventions(self, u: np.ndarray) -> np.ndarray:
        return (np.asarray(u, dtype=np.float64) - self.scale_min[N_STATE:]) / self._span[N_STATE:]

    @property
    def state_range(self) -> np.ndarray:
        """max - min of each state variable (for noise in physical units and per-variable RMSE)."""
        return self._span[:N_STATE].copy()

    def to_dict(self) -> dict:
        return {
            "meta": self.meta,
            "catalog": catalog_dict(),
            "initial_fill": self.initial_fill.tolist(),
            "steps": [
                asdict(s) | {"neighbors": s.neighbors.tolist(), "coef": s.coef.tolist()}
                for s in self.steps
            ],
            "scale_min": self.scale_min.tolist(),
            "scale_max": self.scale_max.tolist(),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the artifact folder ``preprocessor.json`` atomically."""
        with atomic_dir(path) as tmp:
            (tmp / "preprocessor.json").write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> Preprocessor:
        try:
            meta = d["meta"]
            if meta.get("format") != PREPROCESSOR_FORMAT:
                raise PreprocessorError(
                    f"{source}: preprocessor format {meta.get('format')!r}, "
                    f"this code reads format {PREPROCESSOR_FORMAT}"
                )
            if meta.get("catalog_version") != catalog_version():
                raise PreprocessorError(
                    f"{source}: built for variable catalog {meta.get('catalog_version')!r}, "
                    f"this code has {catalog_version()!r}; re-run the ETL"
                )
            steps = [_LinearStep(**s) for s in d["steps"]]
            return cls(d["initial_fill"], steps, d["scale_min"], d["scale_max"], meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise PreprocessorError(f"{source}: malformed preprocessor ({exc!r})") from exc

    @classmethod
    def load(cls, path: str | os.PathLike) -> Preprocessor:
        file = Path(path) / "preprocessor.json"
        if not file.is_file():
            raise PreprocessorError(f"{file}: preprocessor artifact not found")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise PreprocessorError(f"{file}: not valid JSON ({exc})") from exc
        return cls.from_dict(d, source=str(file))
