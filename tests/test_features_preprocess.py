"""Preprocessing on small synthetic frames: clamp, masks, ffill within stay, no future leak,
zero-filled interventions, the imputer fitted on train only, save/load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.catalog import INTERVENTION_NAMES, STATE_BY_NAME, STATE_NAMES
from features.preprocess import (
    FEATURE_NAMES,
    Preprocessor,
    PreprocessorError,
    prepare_bins,
)

HR = STATE_NAMES.index("heart_rate")


def frame(stays: list[int], bins: list[int], **cols) -> pd.DataFrame:
    n = len(stays)
    out = pd.DataFrame({"icustay_id": stays, "bin": bins})
    for name in (*STATE_NAMES, *INTERVENTION_NAMES):
        out[name] = cols.get(name, [np.nan] * n)
    return out


def random_bins(n_stays: int, seed: int) -> pd.DataFrame:
    """Plausible bins with ~40 % missing state values."""
    rng = np.random.default_rng(seed)
    rows = []
    for stay in range(n_stays):
        for b in range(int(rng.integers(2, 8))):
            row = {"icustay_id": stay, "bin": b}
            for name in STATE_NAMES:
                lo, hi = STATE_BY_NAME[name].clamp
                v = rng.uniform(lo + 0.2 * (hi - lo), lo + 0.5 * (hi - lo))
                row[name] = np.nan if rng.random() < 0.4 else v
            row["vasopressor"] = rng.random() if rng.random() < 0.3 else np.nan
            row["mechanical_ventilation"] = np.nan
            row["iv_fluid_ml"] = rng.uniform(0, 2000)
            rows.append(row)
    return pd.DataFrame(rows)


def test_clamp_and_observed_masks() -> None:
    f = frame([1, 1], [0, 1], spo2=[40.0, np.nan], heart_rate=[350.0, 80.0])
    out = prepare_bins(f)
    assert out["spo2"].tolist() == [50.0, 50.0]  # clamped, then carried forward
    assert out["heart_rate"].tolist() == [300.0, 80.0]
    assert out["spo2_observed"].tolist() == [1.0, 0.0]
    assert out["heart_rate_observed"].dtype == np.float32


def test_forward_fill_stays_within_a_stay() -> None:
    f = frame([1, 1, 2, 2], [0, 1, 0, 1], heart_rate=[80.0, np.nan, np.nan, 95.0])
    out = prepare_bins(f)
    assert out["heart_rate"].iloc[1] == 80.0  # carried forward in stay 1
    assert np.isnan(out["heart_rate"].iloc[2])  # never carried into stay 2
    assert out["heart_rate"].iloc[3] == 95.0


def test_forward_fill_sorts_by_stay_and_bin() -> None:
    f = frame([2, 1, 1], [0, 1, 0], heart_rate=[70.0, np.nan, 60.0])
    out = prepare_bins(f)
    assert out[["icustay_id", "bin"]].values.tolist() == [[1, 0], [1, 1], [2, 0]]
    assert out["heart_rate"].tolist() == [60.0, 60.0, 70.0]


def test_interventions_zero_filled() -> None:
    f = frame([1, 1], [0, 1], vasopressor=[0.5, np.nan], iv_fluid_ml=[np.nan, 30000.0])
    out = prepare_bins(f)
    assert out["vasopressor"].tolist() == [0.5, 0.0]
    assert out["mechanical_ventilation"].tolist() == [0.0, 0.0]
    assert out["iv_fluid_ml"].tolist() == [0.0, 20000.0]  # capped at the catalog maximum


def test_no_information_from_later_bins() -> None:
    """Bins 0..k of a stay come out the same whatever is charted in bins k+1.. ."""
    bins = random_bins(30, seed=1)
    pre, _ = Preprocessor.fit(prepare_bins(bins), seed=0)
    full = prepare_bins(bins)
    full_x = pre.impute(full[list(FEATURE_NAMES)].to_numpy())
    stay = bins[bins["icustay_id"] == 3]
    for k in range(len(stay) - 1):
        # Change every later bin wildly: nothing up to bin k may move.
        altered = bins.copy()
        later = (altered["icustay_id"] == 3) & (altered["bin"] > k)
        altered.loc[later, list(STATE_NAMES)] = altered.loc[later, list(STATE_NAMES)] * 0 + 1.0
        alt = prepare_bins(altered)
        alt_x = pre.impute(alt[list(FEATURE_NAMES)].to_numpy())
        rows = ((full["icustay_id"] == 3) & (full["bin"] <= k)).to_numpy()
        np.testing.assert_array_equal(alt_x[rows], full_x[rows])
        np.testing.assert_array_equal(
            alt.loc[rows, "heart_rate_observed"], full.loc[rows, "heart_rate_observed"]
        )


def test_preprocessor_replays_sklearn_and_fills_everything() -> None:
    train = prepare_bins(random_bins(40, seed=2))
    test = prepare_bins(random_bins(10, seed=3))
    pre, imputer = Preprocessor.fit(train, seed=0)
    x = test[list(FEATURE_NAMES)].to_numpy()
    got = pre.impute(x)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, imputer.transform(x), rtol=1e-9, atol=1e-9)
    observed = ~np.isnan(x)
    np.testing.assert_array_equal(got[observed], x[observed])  # measured values untouched


def test_imputer_and_scaler_come_from_the_rows_given() -> None:
    train = prepare_bins(random_bins(40, seed=4))
    other = prepare_bins(random_bins(10, seed=5))
    other[list(STATE_NAMES)] = other[list(STATE_NAMES)] * 0 + 1.0  # far from the train values
    pre_a, _ = Preprocessor.fit(train, seed=0)
    pre_c, _ = Preprocessor.fit(pd.concat([train, other]), seed=0)
    assert not np.array_equal(pre_a.initial_fill, pre_c.initial_fill)
    filled = pre_a.impute(train[list(FEATURE_NAMES)].to_numpy())
    np.testing.assert_array_equal(pre_a.scale_min, filled.min(axis=0))
    np.testing.assert_array_equal(pre_a.scale_max, filled.max(axis=0))
    n = len(STATE_NAMES)
    scaled = np.hstack([pre_a.scale_state(filled[:, :n]), pre_a.scale_interventions(filled[:, n:])])
    assert scaled.min() >= -1e-12 and scaled.max() <= 1 + 1e-12


def test_save_load_roundtrip(tmp_path) -> None:
    train = prepare_bins(random_bins(20, seed=6))
    pre, _ = Preprocessor.fit(train, seed=0)
    pre.save(tmp_path / "pre")
    back = Preprocessor.load(tmp_path / "pre")
    x = train[list(FEATURE_NAMES)].to_numpy()
    np.testing.assert_array_equal(back.impute(x), pre.impute(x))
    np.testing.assert_array_equal(back.scale_min, pre.scale_min)
    with pytest.raises(PreprocessorError, match="not found"):
        Preprocessor.load(tmp_path / "missing")
