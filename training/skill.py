"""Errors on measured values, skill against persistence, and paired patient bootstrap CIs.

Windows are grouped by patient: a patient's windows share one trajectory, so they are not
independent. Intervals resample patients with replacement (the same resample for every model,
i.e. paired), and recompute pooled RMSEs from per-patient sums of squared errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BOOT = 2000


@dataclass
class PatientErrors:
    """Per-patient sums over the measured target values of a set of windows at one K."""

    patients: np.ndarray  # (U,) patient ids, sorted
    sse: np.ndarray  # (U,) sum of squared errors (scaled space)
    sae: np.ndarray  # (U,) sum of absolute errors
    n: np.ndarray  # (U,) number of measured values

    @property
    def rmse(self) -> float:
        total = self.n.sum()
        return float(np.sqrt(self.sse.sum() / total)) if total else float("nan")

    @property
    def mae(self) -> float:
        total = self.n.sum()
        return float(self.sae.sum() / total) if total else float("nan")

    def __add__(self, other: PatientErrors) -> PatientErrors:
        """Pool two sets (e.g. the folds of one seed, which hold disjoint patients)."""
        patients = np.union1d(self.patients, other.patients)
        out = PatientErrors(patients, *(np.zeros(len(patients)) for _ in range(3)))
        for part in (self, other):
            i = np.searchsorted(patients, part.patients)
            out.sse[i] += part.sse
            out.sae[i] += part.sae
            out.n[i] += part.n
        return out


def patient_errors(
    pred: np.ndarray, true: np.ndarray, observed: np.ndarray, patient: np.ndarray
) -> PatientErrors:
    """Sums of (W, V) errors over measured values (``observed > 0``), per patient (W,)."""
    m = (np.asarray(observed) > 0).astype(np.float64)
    err = (np.asarray(pred) - np.asarray(true)) * m
    patients, inv = np.unique(np.asarray(patient), return_inverse=True)
    u = len(patients)
    return PatientErrors(
        patients,
        np.bincount(inv, (err**2).sum(axis=1), minlength=u),
        np.bincount(inv, np.abs(err).sum(axis=1), minlength=u),
        np.bincount(inv, m.sum(axis=1), minlength=u),
    )


def pool(parts: list[PatientErrors]) -> PatientErrors:
    """Per-patient sums added up (e.g. the folds of one seed)."""
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


def mean_over_runs(runs: list[PatientErrors]) -> PatientErrors:
    """Average per-patient sums over repeated runs (seeds) of the same patients."""
    pooled = pool(runs)
    k = len(runs)
    return PatientErrors(pooled.patients, pooled.sse / k, pooled.sae / k, pooled.n / k)


def _weights(n_units: int, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_boot).astype(float)


def _aligned(a: PatientErrors, b: PatientErrors) -> None:
    if not np.array_equal(a.patients, b.patients):
        raise ValueError("paired comparison needs the same patients (the same windows)")


def rmse_ratio(
    a: PatientErrors, b: PatientErrors, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """RMSE_a / RMSE_b on the same windows, with a paired patient-bootstrap percentile CI."""
    _aligned(a, b)
    point = a.rmse / b.rmse if b.rmse > 0 else float("nan")
    if len(a.patients) < 2:
        return point, float("nan"), float("nan")
    w = _weights(len(a.patients), n_boot, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        ra = np.sqrt((w @ a.sse) / (w @ a.n))
        rb = np.sqrt((w @ b.sse) / (w @ b.n))
        ratios = ra / rb
    ratios = ratios[np.isfinite(ratios)]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(ratios, [alpha, 1 - alpha]) if len(ratios) else (np.nan, np.nan)
    return float(point), float(lo), float(hi)


def skill(
    model: PatientErrors, reference: PatientErrors, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float, float]:
    """``1 - RMSE_model / RMSE_reference`` with its 95% paired-bootstrap CI (lo, hi)."""
    r, lo, hi = rmse_ratio(model, reference, n_boot, seed)
    return 1.0 - r, 1.0 - hi, 1.0 - lo


def rmse_ci(e: PatientErrors, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """95% patient-bootstrap CI of one model's pooled RMSE."""
    if len(e.patients) < 2:
        return float("nan"), float("nan")
    w = _weights(len(e.patients), n_boot, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt((w @ e.sse) / (w @ e.n))
    r = r[np.isfinite(r)]
    lo, hi = np.quantile(r, [0.025, 0.975])
    return float(lo), float(hi)
