"""Conformal intervals of a trained model: calibrate on validation, score on test.

:func:`interval_metrics` is the call training makes: it calibrates the model on the
validation stays' closed-loop rollouts and measures coverage and width on the test stays
(clean and under the noise grid); the model's :class:`Calibration` goes into the pyfunc.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from features.catalog import STATE_NAMES
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
from training.evaluate import Evaluation, split_windows
from training.models import DynamicsModel
from training.rollout import Windows
from training.skill import PatientCounts, patient_counts


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
    :func:`training.evaluate.evaluate` made (those of :func:`training.evaluate.split_windows`),
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


def interval_metrics(
    model: DynamicsModel,
    val: StaySequences,
    test: StaySequences,
    pre: Preprocessor,
    ev: Evaluation,
) -> tuple[Calibration, Coverage, dict[str, float]]:
    """Calibrate ``model`` on ``val`` (steps 1..max K) and score the band on ``ev``, the
    model's evaluation on ``test``: its clean windows and those under each input-noise sigma.

    Returns the calibration, the clean coverage and the metrics (``test/``, ``noise/`` and the
    non-adaptive alternative's ``test/width_absolute_...``).
    """
    levels, wins = DEFAULT_LEVELS, ev.windows
    res = calibration_residuals(model, val, pre, max(wins))
    cal = fit_calibration(res, levels)
    cov = coverage(cal, wins, test.raw_state, pre, levels)
    metrics = coverage_metrics(cov, "test/")
    metrics["conformal/n_adaptive"] = float(cal.adaptive.sum())
    # What adaptivity bought: the same recipe with absolute scores, same windows.
    absolute = fit_calibration(res, levels, adaptive="never")
    metrics |= coverage_metrics(
        coverage(absolute, wins, test.raw_state, pre, levels), "test/", variant="_absolute"
    )
    for s, (noisy, noisy_raw) in ev.noisy.items():
        if s > 0:
            metrics |= coverage_metrics(
                coverage(cal, noisy, noisy_raw, pre, levels), "noise/", f"_sigma{s:g}"
            )
    return cal, cov, metrics
