"""Skill against persistence with paired patient-bootstrap intervals; the direct ridge."""

from __future__ import annotations

import numpy as np
import pytest

from features.catalog import N_STATE
from training.models.direct import DirectRidge
from training.skill import (
    mean_over_runs,
    patient_counts,
    patient_errors,
    pool,
    rate_ci,
    rmse_ci,
    rmse_ratio,
    skill,
)


def _errors(scale: float, n_patients: int = 30, seed: int = 0, windows: int = 5):
    rng = np.random.default_rng(seed)
    w = n_patients * windows
    true = rng.normal(size=(w, 4))
    noise = rng.normal(size=(w, 4))
    observed = rng.integers(0, 2, size=(w, 4))
    patient = np.repeat(np.arange(100, 100 + n_patients), windows)
    return true, noise, observed, patient, scale


def test_patient_errors_pool_measured_values_only() -> None:
    pred = np.array([[1.0, 5.0], [2.0, 0.0], [0.0, 0.0]])
    true = np.zeros((3, 2))
    observed = np.array([[1, 0], [1, 1], [0, 0]])
    e = patient_errors(pred, true, observed, np.array([7, 7, 9]))
    assert e.patients.tolist() == [7, 9]
    assert e.sse.tolist() == [5.0, 0.0]  # 1 + 4; the unmeasured 5.0 and patient 9 count 0
    assert e.n.tolist() == [3.0, 0.0]
    assert e.rmse == pytest.approx(np.sqrt(5 / 3))
    assert e.mae == pytest.approx(3 / 3)


def test_identical_models_have_zero_skill_and_a_zero_width_interval() -> None:
    true, noise, obs, patient, _ = _errors(1.0)
    e = patient_errors(true + noise, true, obs, patient)
    s, lo, hi = skill(e, e)
    assert (s, lo, hi) == (0.0, 0.0, 0.0)


def test_a_uniformly_better_model_has_skill_with_an_interval_above_zero() -> None:
    true, noise, obs, patient, _ = _errors(1.0)
    ref = patient_errors(true + noise, true, obs, patient)
    better = patient_errors(true + 0.8 * noise, true, obs, patient)
    s, lo, hi = skill(better, ref)
    assert s == pytest.approx(0.2)
    assert 0 < lo <= s <= hi


def test_noisy_difference_on_few_patients_gives_an_interval_across_zero() -> None:
    rng = np.random.default_rng(1)
    true, noise, obs, patient, _ = _errors(1.0, n_patients=8)
    a = patient_errors(true + noise, true, obs, patient)
    b = patient_errors(true + rng.normal(size=noise.shape), true, obs, patient)
    r, lo, hi = rmse_ratio(a, b)
    assert lo < 1.0 < hi
    assert lo <= r <= hi


def test_bootstrap_resamples_patients_not_windows() -> None:
    """One patient with a huge error: a window-level bootstrap would give a narrow interval,
    a patient-level one must widen to cover samples with and without that patient."""
    true, noise, obs, patient, _ = _errors(1.0, n_patients=10, windows=20)
    obs = np.ones_like(obs)
    noisy = noise.copy()
    noisy[patient == 100] *= 20
    e = patient_errors(true + noisy, true, obs, patient)
    lo, hi = rmse_ci(e)
    without = patient_errors(
        (true + noise)[patient != 100], true[patient != 100], obs[:180], patient[patient != 100]
    )
    assert lo < 1.5 * without.rmse < e.rmse < hi


def test_paired_comparison_needs_the_same_patients() -> None:
    true, noise, obs, patient, _ = _errors(1.0)
    a = patient_errors(true + noise, true, obs, patient)
    b = patient_errors(true + noise, true, obs, patient + 1)
    with pytest.raises(ValueError, match="same patients"):
        rmse_ratio(a, b)


def test_mean_over_runs_averages_per_patient_sums() -> None:
    true, noise, obs, patient, _ = _errors(1.0)
    a = patient_errors(true + noise, true, obs, patient)
    b = patient_errors(true + 2 * noise, true, obs, patient)
    m = mean_over_runs([a, b])
    assert np.allclose(m.sse, (a.sse + b.sse) / 2)
    assert np.allclose(m.n, a.n)


def test_patient_counts_sum_per_patient_and_pool_across_folds() -> None:
    a = patient_counts(np.array([1, 2, 0]), np.array([2, 3, 1]), np.array([9, 7, 9]))
    assert a.patients.tolist() == [7, 9]
    assert a.hits.tolist() == [2.0, 1.0] and a.n.tolist() == [3.0, 3.0]
    assert a.rate == pytest.approx(3 / 6)
    b = patient_counts(np.array([4]), np.array([4]), np.array([8]))
    both = pool([a, b])
    assert both.patients.tolist() == [7, 8, 9]
    assert both.hits.tolist() == [2.0, 4.0, 1.0] and both.n.tolist() == [3.0, 4.0, 3.0]
    assert both.rate == pytest.approx(7 / 10)


def test_coverage_interval_resamples_patients_and_brackets_the_rate() -> None:
    """A band that misses only one patient's values: patient resamples with and without that
    patient spread the interval; when every patient has the same rate it has no width."""
    patient = np.repeat(np.arange(10), 20)
    n = np.ones(len(patient))
    hits = np.where(patient == 0, 0.0, 1.0)
    c = patient_counts(hits, n, patient)
    lo, hi = rate_ci(c)
    assert c.rate == pytest.approx(0.9)
    assert lo < 0.9 < hi == 1.0
    same = patient_counts(np.tile([1.0, 0.0], 100), n, patient)
    assert rate_ci(same) == pytest.approx((0.5, 0.5))
    assert np.isnan(rate_ci(patient_counts(hits[:20], n[:20], patient[:20]))).all()
    # More patients, same per-patient rates: a narrower interval.
    wide = rate_ci(patient_counts(hits[:100], n[:100], patient[:100]))
    assert hi - lo < wide[1] - wide[0]


def test_direct_ridge_recovers_linear_k_step_dynamics() -> None:
    """Where the K-step change is an exact linear function of bin t's inputs and the planned
    interventions, the direct ridge predicts it (near-)exactly, on measured targets only."""
    rng = np.random.default_rng(0)
    width = 2 * N_STATE + 3
    inputs, states = [], []
    for _ in range(40):
        n = 9
        x = np.zeros((n, width))
        x[:, 2 * N_STATE :] = rng.uniform(0, 1, (n, 3))
        x[0, :N_STATE] = rng.uniform(0, 1, N_STATE)
        for t in range(1, n):
            x[t, :N_STATE] = 0.9 * x[t - 1, :N_STATE] + 0.1 * x[t - 1, 2 * N_STATE]
        x[:, N_STATE : 2 * N_STATE] = 1.0
        inputs.append(x)
        states.append(x[:, :N_STATE].copy())
    model = DirectRidge(horizon=3, alphas=(1e-8,)).fit(inputs, states, (1, 3))
    for k in (1, 3):
        pred, stay, start = model.predict(inputs, k)
        true = np.stack([states[i][s + k] for i, s in zip(stay, start, strict=True)])
        assert np.abs(pred - true).max() < 1e-5
        assert len(stay) == sum(len(x) - k for x in inputs)  # every window, rollout order


def _noisy_levels(
    n_stays: int, n_bins: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Noisy measurements around a per-stay level, some bins unmeasured (forward-filled)."""
    rng = np.random.default_rng(seed)
    inputs, states = [], []
    for _ in range(n_stays):
        level = rng.normal(0.5, 0.1, N_STATE)
        y = level + rng.normal(0, 0.1, (n_bins, N_STATE))
        measured = rng.uniform(size=(n_bins, N_STATE)) < 0.7
        measured[0] = True
        filled = y.copy()
        for t in range(1, n_bins):
            filled[t] = np.where(measured[t], y[t], filled[t - 1])
        x = np.zeros((n_bins, 2 * N_STATE + 3))
        x[:, :N_STATE], x[:, N_STATE : 2 * N_STATE] = filled, measured
        x[:, 2 * N_STATE :] = rng.uniform(0, 1, (n_bins, 3))
        inputs.append(x)
        states.append(filled)
    return inputs, states


def test_direct_ridge_history_uses_no_future_bins() -> None:
    """A window's prediction depends on its stay's bins up to t and the interventions of bins
    t..t+K-1 only: rewriting everything later leaves it unchanged, rewriting the past does not."""
    inputs, states = _noisy_levels(30, 10, seed=1)
    model = DirectRidge(horizon=2, alphas=(1e-3,)).fit(inputs, states, (2,))
    s, k = 4, 2
    base, stay, start = model.predict(inputs, k)
    w = int(np.flatnonzero((stay == 0) & (start == s))[0])

    rng = np.random.default_rng(2)
    future = [x.copy() for x in inputs]
    future[0][s + 1 :, : 2 * N_STATE] = rng.uniform(0, 1, future[0][s + 1 :, : 2 * N_STATE].shape)
    future[0][s + k :, 2 * N_STATE :] = rng.uniform(0, 1, future[0][s + k :, 2 * N_STATE :].shape)
    assert np.array_equal(model.predict(future, k)[0][w], base[w])

    past = [x.copy() for x in inputs]
    past[0][:s, :N_STATE] += 0.3
    assert np.abs(model.predict(past, k)[0][w] - base[w]).min() > 1e-6


def test_direct_ridge_beats_persistence_on_noisy_levels() -> None:
    """Noisy measurements around a stay's level: the best forecast is that level, which the
    stay's measured history estimates; persistence carries the last noise forward. Scored on
    held-out stays, measured targets only. (A design without the history summaries, shrinking
    the state at t towards the population mean, reached about 0.10 skill here.)"""
    train, train_states = _noisy_levels(60, 12, seed=3)
    test, test_states = _noisy_levels(30, 12, seed=4)
    model = DirectRidge(horizon=3).fit(train, train_states, (1, 3))
    for k in (1, 3):
        pred, stay, start = model.predict(test, k)
        true = np.stack([test_states[i][s + k] for i, s in zip(stay, start, strict=True)])
        now = np.stack([test_states[i][s] for i, s in zip(stay, start, strict=True)])
        obs = np.stack(
            [test[i][s + k, N_STATE : 2 * N_STATE] > 0 for i, s in zip(stay, start, strict=True)]
        )
        rmse = np.sqrt(np.mean((pred - true)[obs] ** 2))
        rmse_persistence = np.sqrt(np.mean((now - true)[obs] ** 2))
        assert 1 - rmse / rmse_persistence > 0.15


def test_the_penalty_search_chooses_what_grid_search_chooses() -> None:
    """The one-call-per-fold search picks the same penalty as scikit-learn's GridSearchCV over
    the same GroupKFold, on designs where the best penalty differs."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, GroupKFold

    from training.models.direct import ALPHAS, grouped_cv_alpha

    rng = np.random.default_rng(5)
    chosen = set()
    for trial in range(12):
        n, p = 120, 9
        x = rng.normal(size=(n, p)) * rng.uniform(0.1, 3, p)
        y = x @ rng.normal(size=p) * (trial % 4) / 3 + rng.normal(0, 1 + trial % 3, n) + 2.0
        groups = rng.integers(0, 4 + trial, n)
        search = GridSearchCV(
            Ridge(),
            {"alpha": list(ALPHAS)},
            cv=GroupKFold(n_splits=min(5, len(np.unique(groups)))),
            scoring="neg_mean_squared_error",
        ).fit(x, y, groups=groups)
        alpha = grouped_cv_alpha(x, y, groups, ALPHAS)
        assert alpha == search.best_params_["alpha"]
        chosen.add(alpha)
    assert len(chosen) >= 3


def test_repeated_runs_that_agree_give_the_one_run_interval() -> None:
    true, noise, obs, patient, _ = _errors(1.0)
    a = patient_errors(true + noise, true, obs, patient)
    b = patient_errors(true + 1.2 * noise, true, obs, patient)
    assert rmse_ratio([a, a, a], [b, b, b]) == pytest.approx(rmse_ratio(a, b))
    assert rmse_ci([a, a]) == pytest.approx(rmse_ci(a))


def test_runs_that_disagree_widen_the_interval_beyond_the_patient_bootstrap() -> None:
    """One of three seeds makes model a 20% better, the other two make no difference: the
    patients alone (errors averaged over seeds) show a difference that two seeds of three do
    not; resampling the seeds too must not."""
    true, noise, obs, patient, _ = _errors(1.0, n_patients=40)
    b = patient_errors(true + noise, true, obs, patient)
    a_runs = [patient_errors(true + s * noise, true, obs, patient) for s in (0.8, 1.0, 1.0)]
    patients_only = rmse_ratio(mean_over_runs(a_runs), mean_over_runs([b, b, b]))
    with_seeds = rmse_ratio(a_runs, [b, b, b])
    assert with_seeds[0] == pytest.approx(patients_only[0])
    assert patients_only[2] < 0.97  # "a is better", from the patients alone
    assert with_seeds[1] < patients_only[1] and with_seeds[2] > 0.99


def test_runs_are_paired_by_count_too() -> None:
    true, noise, obs, patient, _ = _errors(1.0)
    a = patient_errors(true + noise, true, obs, patient)
    with pytest.raises(ValueError, match="same patients"):
        rmse_ratio([a, a], [a, a, a])
