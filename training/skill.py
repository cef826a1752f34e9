"""Errors on measured values, skill against persistence, and paired patient bootstrap CIs.

Windows are grouped by patient: a patient's windows share one trajectory, so they are not
independent. Intervals resample patients with replacement (the same resample for every model,
i.e. paired), and recompute pooled RMSEs from per-patient sums of squared errors, and pooled
proportions (a prediction band's coverage) from per-patient counts.

Errors of repeated runs (a CV's seeds: other folds, other initialisations) are passed as a list,
and then each replicate first resamples the runs, then the patients: a patient bootstrap of one
run sees which patients were held out, not which initialisations training drew, and a
difference of a few tenths of a percent from one run need not repeat in the next
(docs/results.md, "The weight and the ensemble size").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np

N_BOOT = 2000


def _pooled(total: np.ndarray, n: np.ndarray) -> float:
    """``sum(total) / sum(n)`` over patients; NaN when nothing was measured."""
    count = n.sum()
    return float(total.sum() / count) if count else float("nan")


def _by_patient(patient: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sorted patient ids (U,) and, for each per-window array (W,), its per-patient sums (U,)."""
    patients, inv = np.unique(np.asarray(patient), return_inverse=True)
    u = len(patients)
    sums = (np.bincount(inv, np.asarray(v, dtype=np.float64), minlength=u) for v in values)
    return (patients, *sums)


@dataclass
class _PerPatient:
    patients: np.ndarray  # (U,) patient ids, sorted

    def __add__(self, other):  # noqa: ANN001, ANN204 - the same subclass
        """Pool two sets (e.g. the folds of one seed, which hold disjoint patients): every
        field after ``patients`` is added patient by patient."""
        patients = np.union1d(self.patients, other.patients)
        names = [f.name for f in fields(self) if f.name != "patients"]
        out = type(self)(patients, *(np.zeros(len(patients)) for _ in names))
        for part in (self, other):
            i = np.searchsorted(patients, part.patients)
            for name in names:
                getattr(out, name)[i] += getattr(part, name)
        return out


@dataclass
class PatientErrors(_PerPatient):
    """Per-patient sums over the measured target values of a set of windows at one K."""

    sse: np.ndarray  # (U,) sum of squared errors (scaled space)
    sae: np.ndarray  # (U,) sum of absolute errors
    n: np.ndarray  # (U,) number of measured values

    @property
    def rmse(self) -> float:
        return float(np.sqrt(_pooled(self.sse, self.n)))

    @property
    def mae(self) -> float:
        return _pooled(self.sae, self.n)


@dataclass
class PatientCounts(_PerPatient):
    """Per-patient counts behind a pooled proportion: ``hits`` of ``n`` measured values (e.g.
    the values inside a prediction band)."""

    hits: np.ndarray  # (U,)
    n: np.ndarray  # (U,)

    @property
    def rate(self) -> float:
        return _pooled(self.hits, self.n)


def patient_counts(hits: np.ndarray, n: np.ndarray, patient: np.ndarray) -> PatientCounts:
    """Per-patient sums of per-window ``hits`` and ``n`` (W,), patient ids (W,)."""
    return PatientCounts(*_by_patient(patient, hits, n))


def patient_errors(
    pred: np.ndarray, true: np.ndarray, observed: np.ndarray, patient: np.ndarray
) -> PatientErrors:
    """Sums of (W, V) errors over measured values (``observed > 0``), per patient (W,)."""
    m = (np.asarray(observed) > 0).astype(np.float64)
    err = (np.asarray(pred) - np.asarray(true)) * m
    return PatientErrors(
        *_by_patient(patient, (err**2).sum(axis=1), np.abs(err).sum(axis=1), m.sum(axis=1))
    )


def pool(parts: list[PatientErrors]) -> PatientErrors:
    """Per-patient sums added up (e.g. the folds of one seed)."""
    return sum(parts[1:], parts[0])


def mean_over_runs(runs: list[PatientErrors]) -> PatientErrors:
    """Average per-patient sums over repeated runs (seeds) of the same patients."""
    pooled = pool(runs)
    k = len(runs)
    return PatientErrors(pooled.patients, pooled.sse / k, pooled.sae / k, pooled.n / k)


Errors = PatientErrors | Sequence[PatientErrors]
"""One run's per-patient errors, or those of repeated runs over the same patients."""


def _per_run(e: Errors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient ids (U,) and every run's per-patient sse and n (S, U), aligned by patient."""
    runs = [e] if isinstance(e, PatientErrors) else list(e)
    patients = pool(runs).patients
    sse, n = np.zeros((2, len(runs), len(patients)))
    for i, r in enumerate(runs):
        j = np.searchsorted(patients, r.patients)
        sse[i, j], n[i, j] = r.sse, r.n
    return patients, sse, n


def _bootstrap_ci(
    stat: Callable[[np.ndarray, np.ndarray], np.ndarray], n_units: int, n_boot: int, n_runs: int = 1
) -> tuple[float, float]:
    """95% percentile interval of ``stat(w, v)`` over ``n_boot`` replicates. ``w`` (n_boot, U)
    counts how often each of the ``n_units`` patients is drawn with replacement; ``v``
    (n_boot, n_runs) weighs the runs, drawn with replacement (all 1 for one run). Every call
    makes the same draws, so two models' replicates are paired. Non-finite replicates are
    left out; NaN with fewer than 2 patients."""
    if n_units < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(0)
    w = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_boot).astype(float)
    v = np.ones((n_boot, 1))
    if n_runs > 1:  # drawn after w: one run's intervals stay what they were
        v = rng.multinomial(n_runs, np.full(n_runs, 1.0 / n_runs), size=n_boot) / n_runs
    with np.errstate(divide="ignore", invalid="ignore"):
        r = stat(w, v)
    r = r[np.isfinite(r)]
    if not len(r):
        return float("nan"), float("nan")
    lo, hi = np.quantile(r, [0.025, 0.975])
    return float(lo), float(hi)


def _rmse(sse: np.ndarray, n: np.ndarray, w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pooled RMSE of every replicate: runs weighted by ``v``, then patients by ``w``."""
    return np.sqrt(((v @ sse) * w).sum(axis=1) / ((v @ n) * w).sum(axis=1))


def rmse_ratio(a: Errors, b: Errors, n_boot: int = N_BOOT) -> tuple[float, float, float]:
    """RMSE_a / RMSE_b on the same windows (of the mean over runs), with a paired 95% bootstrap
    CI (lo, hi) over patients, and over runs when they are given as lists."""
    (pa, sa, na), (pb, sb, nb) = _per_run(a), _per_run(b)
    if not np.array_equal(pa, pb) or len(sa) != len(sb):
        raise ValueError("paired comparison needs the same patients (the same windows)")
    ra, rb = (float(np.sqrt(s.sum() / n.sum())) for s, n in ((sa, na), (sb, nb)))
    point = ra / rb if rb > 0 else float("nan")
    ci = _bootstrap_ci(
        lambda w, v: _rmse(sa, na, w, v) / _rmse(sb, nb, w, v), len(pa), n_boot, len(sa)
    )
    return (float(point), *ci)


def skill(model: Errors, reference: Errors, n_boot: int = N_BOOT) -> tuple[float, float, float]:
    """``1 - RMSE_model / RMSE_reference`` with its 95% paired-bootstrap CI (lo, hi)."""
    r, lo, hi = rmse_ratio(model, reference, n_boot)
    return 1.0 - r, 1.0 - hi, 1.0 - lo


def rmse_ci(e: Errors, n_boot: int = N_BOOT) -> tuple[float, float]:
    """95% bootstrap CI of one model's pooled RMSE (over patients, and runs when a list)."""
    patients, sse, n = _per_run(e)
    return _bootstrap_ci(lambda w, v: _rmse(sse, n, w, v), len(patients), n_boot, len(sse))


def rate_ci(c: PatientCounts, n_boot: int = N_BOOT) -> tuple[float, float]:
    """95% patient-bootstrap CI of a pooled proportion (``c.rate``)."""
    return _bootstrap_ci(lambda w, v: (w @ c.hits) / (w @ c.n), len(c.patients), n_boot)
