"""Conformal intervals of a trained model: calibrate on validation, score on test, log.

:func:`log_intervals` is the one call training makes: it calibrates the model (and
persistence, the naive reference band) on the validation stays' closed-loop rollouts, measures
coverage and width on the test stays (clean and under the noise grid), logs the metrics, a
per-variable table and the plots, and returns the model's :class:`Calibration` for the pyfunc.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.catalog import N_STATE, STATE_NAMES
from features.preprocess import Preprocessor
from training.conformal import (
    DEFAULT_LEVELS,
    LOOKBACK,
    Calibration,
    Residuals,
    fit_calibration,
    level_label,
    recent_variability,
    stay_windows,
)
from training.data import StaySequences
from training.models import DynamicsModel
from training.rollout import Windows, add_state_noise, rollout_windows, state_bounds
from training.skill import PatientCounts, patient_counts

# Coverage against nominal is plotted over these levels (the calibration serves any level).
PLOT_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def split_windows(
    model: DynamicsModel,
    seqs: StaySequences,
    pre: Preprocessor,
    ks: Sequence[int],
    noise_sigma: float = 0.0,
    seed: int = 0,
) -> tuple[dict[int, Windows], list[np.ndarray]]:
    """Closed-loop rollouts from every start bin (float64, clamped, as the Forecaster runs)
    and the raw histories they start from (noisy ones when ``noise_sigma`` > 0: the band's
    difficulty estimate sees the same noisy history as the model)."""
    model = copy.deepcopy(model).double().eval()
    inputs, raw = seqs.inputs, seqs.raw_state
    if noise_sigma > 0:
        inputs = add_state_noise(inputs, noise_sigma, seed)
        # The same noise in physical units, on the measured values only (NaN stays NaN).
        raw = [
            r + (x[:, :N_STATE] - s[:, :N_STATE]) * pre.state_range
            for r, x, s in zip(raw, inputs, seqs.inputs, strict=True)
        ]
    wins = rollout_windows(model, inputs, seqs.state, tuple(ks), bounds=state_bounds(pre))
    return wins, raw


def calibration_residuals(
    model: DynamicsModel, seqs: StaySequences, pre: Preprocessor, horizon: int
) -> list[Residuals]:
    """|residual| (physical, NaN where not measured) at step h of the h-step rollouts of
    ``model`` on ``seqs`` (validation stays), h = 1..H."""
    ks = tuple(range(1, horizon + 1))
    wins, raw = split_windows(model, seqs, pre, ks)
    out = []
    for h, w in wins.items():
        pred = pre.unscale_state(w.pred[:, h - 1])
        true = pre.unscale_state(w.true[:, h - 1])
        err = np.where(w.observed[:, h - 1] > 0, np.abs(pred - true), np.nan)
        d = recent_variability(stay_windows(raw, w.stay, w.start, LOOKBACK))
        out.append(Residuals(err, d, seqs.subject_ids[w.stay]))
    return out


@dataclass
class Coverage:
    """Coverage and width of one band on one split: ``summary[(K, level)]`` pooled over the
    measured values of every variable (width in scaled min-max units, comparable across
    variables), ``rows`` per (K, level, variable) in physical units, and, when the patients
    were given, ``patients[(K, level)]``: the values inside the band per patient (for a
    patient-bootstrap interval of the coverage, :func:`training.skill.rate_ci`)."""

    summary: dict[tuple[int, float], dict[str, float]]
    rows: list[dict]
    patients: dict[tuple[int, float], PatientCounts] = field(default_factory=dict)


def coverage(
    cal: Calibration,
    wins: dict[int, Windows],
    raw: list[np.ndarray],
    pre: Preprocessor,
    levels: Sequence[float],
    patient: np.ndarray | None = None,
) -> Coverage:
    """Empirical coverage and mean width at the K-th step of every K-step window;
    ``patient``: the patient id of each stay of the split, to count per patient too."""
    summary: dict[tuple[int, float], dict[str, float]] = {}
    rows: list[dict] = []
    per_patient: dict[tuple[int, float], PatientCounts] = {}
    span = pre.state_range
    for k, w in wins.items():
        if not len(w.stay):
            continue
        pred = pre.unscale_state(w.pred)
        true = pre.unscale_state(w.true[:, k - 1])
        measured = w.observed[:, k - 1] > 0
        bands = cal.intervals(pred, stay_windows(raw, w.stay, w.start, cal.lookback), levels)
        for level, (lo, hi) in bands.items():
            lo, hi = lo[:, k - 1], hi[:, k - 1]
            inside = (true >= lo) & (true <= hi)
            width = hi - lo
            n = int(measured.sum())
            summary[(k, level)] = {
                "coverage": float(inside[measured].mean()) if n else float("nan"),
                "width": float((width / span)[measured].mean()) if n else float("nan"),
                "n": float(n),
            }
            if patient is not None:
                per_patient[(k, level)] = patient_counts(
                    (inside & measured).sum(axis=1), measured.sum(axis=1), patient[w.stay]
                )
            for j, name in enumerate(STATE_NAMES):
                m = measured[:, j]
                rows.append(
                    {
                        "k": k,
                        "level": level,
                        "variable": name,
                        "coverage": float(inside[m, j].mean()) if m.any() else float("nan"),
                        "width": float(width[m, j].mean()) if m.any() else float("nan"),
                        "n_measured": int(m.sum()),
                        "adaptive": bool(cal.adaptive[j]),
                    }
                )
    return Coverage(summary, rows, per_patient)


def held_out_coverage(
    model: DynamicsModel,
    val: StaySequences,
    test: StaySequences,
    wins: dict[int, Windows],
    pre: Preprocessor,
    levels: tuple[float, ...] = DEFAULT_LEVELS,
) -> Coverage:
    """Calibrate ``model`` on ``val`` as training does (steps 1..max K) and
    score the band on ``wins``, the clean rollouts of ``test`` that
    :func:`training.evaluate.evaluate` made (the same windows :func:`split_windows` gives),
    counted per patient too."""
    cal = fit_calibration(calibration_residuals(model, val, pre, max(wins)), levels)
    return coverage(cal, wins, test.raw_state, pre, levels, test.subject_ids)


def coverage_metrics(
    cov: Coverage, prefix: str, suffix: str = "", variant: str = ""
) -> dict[str, float]:
    """``{prefix}coverage{variant}_k{K}_l{L}{suffix}`` and the same for ``width``."""
    out = {}
    for (k, level), m in cov.summary.items():
        tag = f"k{k}_l{level_label(level)}{suffix}"
        out[f"{prefix}coverage{variant}_{tag}"] = m["coverage"]
        out[f"{prefix}width{variant}_{tag}"] = m["width"]
    return out


def log_intervals(
    model: DynamicsModel,
    val: StaySequences,
    test: StaySequences,
    pre: Preprocessor,
    ks: Sequence[int],
    sigmas: Sequence[float],
    seed: int,
    plots: bool,
    title: str,
) -> tuple[Calibration, dict[str, float]]:
    """Calibrate ``model`` and persistence on ``val``, score both on ``test``, inside the active
    MLflow run.

    Logs the per-variable table (``intervals_test.json``) and, with ``plots``, the plots
    (``plots/interval_*.png``). Returns the model's calibration and the metrics (``test/``,
    ``noise/``, ``baseline/`` persistence and the non-adaptive alternative's
    ``test/width_absolute_...``) for the caller to log with the rest.
    """
    import tempfile

    import mlflow
    import pandas as pd

    from training.models import ModelConfig, build_model

    ks, levels = tuple(ks), DEFAULT_LEVELS
    res = calibration_residuals(model, val, pre, max(ks))
    cal = fit_calibration(res, levels)
    wins, raw = split_windows(model, test, pre, ks)
    cov = coverage(cal, wins, raw, pre, levels)
    metrics = coverage_metrics(cov, "test/")
    metrics["conformal/n_adaptive"] = float(cal.adaptive.sum())
    # What adaptivity bought: the same recipe with absolute scores, same windows.
    absolute = fit_calibration(res, levels, adaptive="never")
    metrics |= coverage_metrics(
        coverage(absolute, wins, raw, pre, levels), "test/", variant="_absolute"
    )
    for s in sigmas:
        if s > 0:
            noisy, noisy_raw = split_windows(model, test, pre, ks, s, seed)
            metrics |= coverage_metrics(
                coverage(cal, noisy, noisy_raw, pre, levels), "noise/", f"_sigma{s:g}"
            )
    persistence = build_model(ModelConfig(model="persistence"))
    p_wins, _ = split_windows(persistence, test, pre, ks)
    p_cov = held_out_coverage(persistence, val, test, p_wins, pre)
    metrics |= coverage_metrics(p_cov, "baseline/persistence_")
    if cov.rows:
        mlflow.log_table(pd.DataFrame(cov.rows), "intervals_test.json")
    if plots:
        with tempfile.TemporaryDirectory() as tmp:
            _plots(cal, wins, raw, test, pre, Path(tmp), title)
            mlflow.log_artifacts(tmp, artifact_path="plots")
    return cal, metrics


def _plots(
    cal: Calibration,
    wins: dict[int, Windows],
    raw: list[np.ndarray],
    test: StaySequences,
    pre: Preprocessor,
    out: Path,
    title: str,
) -> None:
    from training import plots

    grid = coverage(cal, wins, raw, pre, PLOT_LEVELS).summary
    plots.coverage_vs_nominal(
        {
            k: {lv: grid[(k, lv)]["coverage"] for lv in PLOT_LEVELS}
            for k in wins
            if (k, 0.5) in grid
        },
        out / "interval_coverage.png",
        f"Test coverage of the conformal bands ({title})",
    )
    k = max(wins)
    w = wins[k]
    stays = []
    for n, j in enumerate(w.middle_windows([len(s) for s in test.state])):
        i, s = w.stay[j], int(w.start[j])
        pred = pre.unscale_state(w.pred[j : j + 1])
        bands = cal.intervals(pred, stay_windows(raw, [i], [s], cal.lookback), cal.levels)
        stays.append(
            {
                "truth": test.physical[i],
                "observed": ~np.isnan(test.raw_state[i]),
                "start": s,
                "forecast": pred[0],
                "bands": {lv: (lo[0], hi[0]) for lv, (lo, hi) in bands.items()},
                "label": f"test stay {n + 1}",
            }
        )
    if stays:
        plots.fan_charts(stays, out / "interval_fans.png", f"Test stays: {k}-step bands ({title})")
