"""Conformal calibration math on synthetic residuals (training/conformal.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from features.catalog import N_STATE, STATE_NAMES
from features.preprocess import CLAMP_HIGH, CLAMP_LOW
from training.conformal import (
    Calibration,
    Residuals,
    ScoreTable,
    fit_calibration,
    history_windows,
    recent_variability,
    stay_windows,
)

HR = STATE_NAMES.index("heart_rate")


def conformal_quantile(scores: np.ndarray, level: float, cum: np.ndarray | None = None) -> float:
    """One row's quantile through :class:`ScoreTable` (unit weights by default)."""
    cum = np.arange(1.0, len(scores) + 1) if cum is None else cum
    return float(ScoreTable.build([scores], [cum]).quantiles((level,))[0, 0])


def _typical() -> np.ndarray:
    return (CLAMP_LOW + CLAMP_HIGH) / 2


@pytest.mark.parametrize("n", [1, 4, 9, 19, 20, 99, 250])
@pytest.mark.parametrize("level", [0.5, 0.8, 0.9, 0.95])
def test_quantile_is_the_finite_sample_rank_and_unit_weights_agree(n: int, level: float) -> None:
    scores = np.sort(np.random.default_rng(n).exponential(size=n))
    k = math.ceil((n + 1) * level)
    expected = scores[k - 1] if k <= n else math.inf
    assert conformal_quantile(scores, level) == expected
    assert conformal_quantile(scores, level, np.cumsum(np.ones(n))) == expected
    # Weights that are all equal but not 1 (a single stay) give the same rank.
    assert conformal_quantile(scores, level, np.cumsum(np.full(n, 1 / n))) == expected


def test_one_search_over_all_rows_and_levels_is_the_weighted_rule_of_each_row() -> None:
    """:class:`ScoreTable` (what the service runs) against the weighted rule computed exactly,
    in fractions, row by row: the smallest score whose cumulative weight reaches
    ``level * total * (n + 1) / n``. Stay weights (1 / windows of the stay) make exact ties."""
    from fractions import Fraction

    rng = np.random.default_rng(7)
    scores, cums, fracs = [], [], []
    for n in [0, 1, 2, 5, 9, 19, 40, *rng.integers(1, 80, 30)]:
        stays = rng.integers(0, max(1, n // 3 + 1), n)
        counts = np.bincount(stays)
        order = rng.permutation(n)  # the weights of a sorted row come in any stay order
        w = [Fraction(1, int(counts[stays[i]])) for i in order]
        cum = np.cumsum([Fraction(0), *w])[1:]
        scores.append(np.sort(rng.exponential(size=n)))
        cums.append(np.array([float(c) for c in cum]))
        fracs.append(list(cum))
    levels = [0.05 * i for i in range(1, 20)] + [0.8, 0.95, 0.37]
    got = ScoreTable.build(scores, cums).quantiles(levels)
    for li, level in enumerate(levels):
        lv = Fraction(str(round(level, 10)))
        for r, (s, cum) in enumerate(zip(scores, fracs, strict=True)):
            n = len(s)
            need = lv * cum[-1] * (n + 1) / n if n else None
            i = next((i for i, c in enumerate(cum) if c >= need), None) if n else None
            expected = s[i] if i is not None else math.inf
            assert got[li, r] == expected, (level, r, n)
            assert conformal_quantile(s, level, cums[r]) == expected


def test_quantile_rejects_levels_outside_the_unit_interval() -> None:
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="level"):
            conformal_quantile(np.arange(5.0), bad)


def _exchangeable(rng: np.random.Generator, n: int, sigma: np.ndarray) -> Residuals:
    err = np.abs(rng.normal(0.0, 1.0, (n, N_STATE)) * sigma)
    err[rng.random((n, N_STATE)) < 0.3] = np.nan  # not measured
    return Residuals(err, np.zeros((n, N_STATE)), np.arange(n))


@pytest.mark.parametrize("level", [0.8, 0.95])
def test_coverage_on_exchangeable_residuals(level: float) -> None:
    """Calibrated on 300 residuals per variable, the band covers fresh residuals of the same
    distribution at the nominal rate: averaged over 40 calibrations within 1.5 points, and
    never much below (the finite-sample guarantee is coverage >= level on average)."""
    rng = np.random.default_rng(0)
    # Small against each plausible range: the truth never leaves it, as in the data.
    sigma = 0.04 * (CLAMP_HIGH - CLAMP_LOW)
    covs = []
    for _ in range(40):
        cal = fit_calibration([_exchangeable(rng, 430, sigma)], adaptive="never")
        test = np.abs(rng.normal(0.0, 1.0, (2000, N_STATE)) * sigma)
        pred = np.tile(_typical(), (2000, 1, 1))
        lo, hi = cal.intervals(pred, np.full((2000, 4, N_STATE), np.nan), (level,))[level]
        truth = pred[:, 0] + test * rng.choice([-1, 1], test.shape)
        inside = (truth >= lo[:, 0]) & (truth <= hi[:, 0])
        covs.append(inside.mean())
    assert abs(np.mean(covs) - level) < 0.015
    assert min(covs) > level - 0.05


def _patients(rng: np.random.Generator, n_patients: int, windows: int) -> tuple[Residuals, list]:
    """Half the patients stable (sd 1), half unstable (sd 8): residuals and the recent changes
    of each history scale with the patient's sd."""
    errs, var, groups, hists = [], [], [], []
    for p in range(n_patients):
        sd = 1.0 if p % 2 == 0 else 8.0
        for _ in range(windows):
            hist = np.full((4, N_STATE), np.nan)
            hist[:, HR] = 90 + np.cumsum(rng.normal(0, sd, 4))
            e = np.full(N_STATE, np.nan)
            e[HR] = abs(rng.normal(0, sd))
            errs.append(e)
            hists.append(hist)
            groups.append(p)
    windows_arr = np.stack(hists)
    var = recent_variability(windows_arr)
    return Residuals(np.stack(errs), var, np.array(groups)), windows_arr


def test_adaptive_band_is_narrower_for_stable_patients_and_chosen_when_it_pays() -> None:
    rng = np.random.default_rng(1)
    res, _ = _patients(rng, 40, 10)
    cal = fit_calibration([res], adaptive="auto")
    assert cal.adaptive[HR]  # the two-fold check on the calibration patients finds it pays
    test, windows = _patients(rng, 40, 10)
    pred = np.full((len(windows), 1, N_STATE), 90.0)
    lo, hi = cal.intervals(pred, windows, (0.8,))[0.8]
    width = (hi - lo)[:, 0, HR]
    stable = test.group % 2 == 0
    assert np.median(width[stable]) < 0.5 * np.median(width[~stable])
    inside = test.abs_err[:, HR] <= (hi - pred)[:, 0, HR]
    # Closer to nominal per group than one band for all: absolute over-covers the stable and
    # under-covers the unstable patients.
    absolute = fit_calibration([res], adaptive="never")
    a_lo, a_hi = absolute.intervals(pred, windows, (0.8,))[0.8]
    a_inside = test.abs_err[:, HR] <= (a_hi - pred)[:, 0, HR]
    for group in (stable, ~stable):
        assert abs(inside[group].mean() - 0.8) < abs(a_inside[group].mean() - 0.8)
    assert abs(inside.mean() - 0.8) < 0.06


def test_each_stay_weighs_the_same_whatever_its_length() -> None:
    """One long stay with tiny errors must not shrink the band of the other stays."""
    err = np.full((110, N_STATE), np.nan)
    err[:100, HR] = 0.01  # stay 0: 100 windows
    err[100:, HR] = np.arange(1.0, 11.0)  # stays 1..10: one window each
    groups = np.r_[np.zeros(100, int), np.arange(1, 11)]
    cal = fit_calibration([Residuals(err, np.zeros_like(err), groups)], adaptive="never")
    q = cal.quantile_table((0.8,))[0, 0, HR]
    assert q >= 8.0  # by windows it would be 0.01


def test_intervals_stay_inside_the_clamp_range_and_unsupported_levels_span_it() -> None:
    rng = np.random.default_rng(2)
    res = _exchangeable(rng, 30, np.full(N_STATE, 1e6))
    cal = fit_calibration([res], adaptive="never")
    pred = np.stack([CLAMP_LOW, CLAMP_HIGH])[:, None, :]
    bands = cal.intervals(pred, np.full((2, 4, N_STATE), np.nan), (0.5, 0.99))
    for lo, hi in bands.values():
        assert (lo >= CLAMP_LOW).all() and (hi <= CLAMP_HIGH).all() and (lo <= hi).all()
    lo, hi = bands[0.99]  # 0.99 needs >= 99 scores: the whole plausible range
    np.testing.assert_array_equal(lo[0, 0], CLAMP_LOW)
    np.testing.assert_array_equal(hi[1, 0], CLAMP_HIGH)


def test_steps_beyond_the_calibrated_horizon_reuse_the_last_step() -> None:
    rng = np.random.default_rng(3)
    cal = fit_calibration(
        [_exchangeable(rng, 200, np.full(N_STATE, s)) for s in (1.0, 2.0)], adaptive="never"
    )
    pred = np.tile(_typical(), (1, 4, 1))
    lo, hi = cal.intervals(pred, np.full((1, 4, N_STATE), np.nan), (0.8,))[0.8]
    assert (hi[0, 1] - lo[0, 1] > hi[0, 0] - lo[0, 0])[HR]
    np.testing.assert_array_equal(hi[0, 3], hi[0, 1])


def test_save_load_round_trip_gives_identical_intervals() -> None:
    rng = np.random.default_rng(4)
    res, windows = _patients(rng, 12, 6)
    cal = fit_calibration([res, res], adaptive="auto")
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    pred = np.full((len(windows), 2, N_STATE), 90.0)
    for level in (0.8, 0.95, 0.37):
        a = cal.intervals(pred, windows, (level,))[level]
        b = again.intervals(pred, windows, (level,))[level]
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(again.adaptive, cal.adaptive)


def test_recent_variability_bridges_gaps_and_needs_two_values() -> None:
    w = np.full((3, 4, N_STATE), np.nan)
    w[0, :, HR] = [80, np.nan, 90, 85]  # changes 10 and 5
    w[1, 2, HR] = 80  # one value: no change measured
    w[2, :, HR] = [80, 80, 5000, 80]  # clamped before differencing
    d = recent_variability(w)
    assert d[0, HR] == pytest.approx(7.5)
    assert d[1, HR] == 0.0
    high = CLAMP_HIGH[HR]
    assert d[2, HR] == pytest.approx((0 + 2 * (high - 80)) / 3)


def test_service_and_offline_history_windows_agree() -> None:
    rng = np.random.default_rng(5)
    stays = [rng.normal(size=(n, N_STATE)) for n in (2, 6, 9)]
    stay, start = np.array([0, 1, 1, 2]), np.array([1, 0, 5, 8])
    offline = stay_windows(stays, stay, start, 4)
    padded = np.full((4, 9, N_STATE), np.nan)
    for j, (i, s) in enumerate(zip(stay, start, strict=True)):
        padded[j, : s + 1] = stays[i][: s + 1]
    np.testing.assert_array_equal(history_windows(padded, start + 1, 4), offline)


def test_coverage_counts_per_patient_add_up_to_the_pooled_coverage() -> None:
    """``training.intervals.coverage`` with patient ids: each patient's inside and measured
    counts are those of its stays' windows, and they sum to the pooled figures."""
    from types import SimpleNamespace

    from training.intervals import coverage
    from training.rollout import Windows

    rng = np.random.default_rng(5)
    res, _ = _patients(rng, 6, 20)
    cal = fit_calibration([res], adaptive="never")
    n_stays, t = 5, 6
    raw = [90 + rng.normal(0, 3, (t, N_STATE)) for _ in range(n_stays)]
    stay = np.repeat(np.arange(n_stays), t - 1)
    start = np.tile(np.arange(t - 1), n_stays)
    true = np.stack([raw[i][s + 1] for i, s in zip(stay, start, strict=True)])[:, None]
    pred = true[:, 0] + rng.normal(0, 4, true[:, 0].shape)
    observed = rng.integers(0, 2, true.shape).astype(float)
    wins = {1: Windows(1, stay, start, pred[:, None], true, observed)}
    identity = SimpleNamespace(state_range=np.ones(N_STATE), unscale_state=lambda x: x)
    subject = np.array([11, 11, 12, 13, 13])  # stays 0, 1 and 3, 4: the same patients
    cov = coverage(cal, wins, raw, identity, (0.8,), subject)
    counts, pooled = cov.patients[(1, 0.8)], cov.summary[(1, 0.8)]
    assert counts.patients.tolist() == [11, 12, 13]
    assert counts.n.sum() == pooled["n"] == observed.sum()
    assert counts.rate == pytest.approx(pooled["coverage"])
    lo, hi = cal.intervals(pred[:, None], stay_windows(raw, stay, start, cal.lookback), (0.8,))[0.8]
    inside = (true[:, 0] >= lo[:, 0]) & (true[:, 0] <= hi[:, 0]) & (observed[:, 0] > 0)
    assert counts.hits[1] == inside[stay == 2].sum()
    assert counts.n[0] == observed[(stay == 0) | (stay == 1)].sum()
    assert coverage(cal, wins, raw, identity, (0.8,)).patients == {}
