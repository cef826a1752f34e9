"""Test-split evaluation: K-step rollouts, noise robustness, per-variable errors, latency."""

from __future__ import annotations

import copy
import timeit
from dataclasses import dataclass, field

import numpy as np

from features.catalog import N_STATE, STATE_NAMES
from features.preprocess import Preprocessor
from training.data import StaySequences, pad
from training.metrics import per_variable, summary
from training.models import DynamicsModel
from training.models.direct import DirectRidge
from training.rollout import Windows, add_state_noise, rollout_windows, state_bounds
from training.skill import PatientErrors, patient_errors, skill

KS: tuple[int, ...] = (1, 2, 3, 5)
SIGMAS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05)


def sigma_label(sigma: float) -> str:
    """``0.01`` -> ``"0.01"``, ``0`` -> ``"0"`` (stable metric names)."""
    return f"{sigma:g}"


@dataclass
class Evaluation:
    """Rollout errors of one model on one split.

    ``scaled[K]`` holds MAE / RMSE / R2 of the K-th step of every K-step rollout over every
    value (scaled space; the paper's metric); ``observed[K]`` MAE / RMSE over measured true
    values only (the primary metric), ``errors[K]`` the same as per-patient sums (for skill and
    bootstrap intervals); ``noise[(K, sigma)]`` as ``scaled`` under input noise;
    ``per_variable`` physical-unit rows (all values and measured values); ``noisy[sigma]`` the
    noisy rollouts and the noisy raw histories they start from (:func:`split_windows`).
    """

    scaled: dict[int, dict[str, float]]
    observed: dict[int, dict[str, float]] = field(default_factory=dict)
    noise: dict[tuple[int, float], dict[str, float]] = field(default_factory=dict)
    per_variable: list[dict] = field(default_factory=list)
    windows: dict[int, Windows] = field(default_factory=dict)
    n_windows: dict[int, int] = field(default_factory=dict)
    errors: dict[int, PatientErrors] = field(default_factory=dict)
    noisy: dict[float, tuple[dict[int, Windows], list[np.ndarray]]] = field(default_factory=dict)

    def skill_metrics(self, reference: Evaluation, prefix: str, name: str = "skill") -> dict:
        """``{prefix}/{name}_k{K}`` = 1 - RMSE/RMSE_reference (measured values, same windows)
        with its paired patient-bootstrap 95% CI as ``..._lo`` / ``..._hi``."""
        out: dict[str, float] = {}
        for k, e in self.errors.items():
            if k in reference.errors and e.n.sum() > 0:
                key = f"{prefix}/{name}_k{k}"
                out[key], out[f"{key}_lo"], out[f"{key}_hi"] = skill(e, reference.errors[k])
        return out

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat metric names: ``{prefix}/rmse_k{K}``, ``noise/rmse_k{K}_sigma{S}``, ..."""
        out: dict[str, float] = {}
        for k, m in self.scaled.items():
            for name, v in m.items():
                out[f"{prefix}/{name}_k{k}"] = v
            out[f"{prefix}/n_windows_k{k}"] = float(self.n_windows.get(k, 0))
        for k, m in self.observed.items():
            for name, v in m.items():
                out[f"{prefix}/{name}_measured_k{k}"] = v
        for (k, s), m in self.noise.items():
            tag = f"k{k}_sigma{sigma_label(s)}"
            out[f"noise/rmse_{tag}"], out[f"noise/mae_{tag}"] = m["rmse"], m["mae"]
            base = self.noise.get((k, 0.0), self.scaled.get(k))
            if base and base["rmse"] > 0:
                out[f"noise/rel_degradation_{tag}"] = m["rmse"] / base["rmse"] - 1.0
        return out


def split_windows(
    model: DynamicsModel,
    seqs: StaySequences,
    pre: Preprocessor,
    ks: tuple[int, ...],
    noise_sigma: float = 0.0,
    seed: int = 0,
) -> tuple[dict[int, Windows], list[np.ndarray]]:
    """Closed-loop rollouts from every start bin (float64 on a copy of the model, clamped, as
    the Forecaster runs) and the raw histories they start from (noisy ones when
    ``noise_sigma`` > 0: a band's difficulty estimate sees the same noisy history as the
    model). The noise is Gaussian in scaled space, on the state part of the inputs only."""
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


def evaluate(
    model: DynamicsModel,
    seqs: StaySequences,
    pre: Preprocessor,
    ks: tuple[int, ...] = KS,
    sigmas: tuple[float, ...] = (),
    seed: int = 0,
) -> Evaluation:
    """Rollouts from every start bin of every stay (the same windows for every model)."""
    wins, raw = split_windows(model, seqs, pre, ks)
    ev = Evaluation(scaled={}, windows=wins)
    for k, w in wins.items():
        _score(ev, k, w.pred[:, -1], w.true[:, -1], w.observed[:, -1], w.stay, seqs, pre)
    for s in sigmas:
        ev.noisy[s] = (wins, raw) if s == 0 else split_windows(model, seqs, pre, ks, s, seed)
        for k, w in ev.noisy[s][0].items():
            ev.noise[(k, s)] = summary(w.pred[:, -1], w.true[:, -1])
    return ev


def _score(
    ev: Evaluation,
    k: int,
    pred: np.ndarray,
    true: np.ndarray,
    obs: np.ndarray,
    stay: np.ndarray,
    seqs: StaySequences,
    pre: Preprocessor,
) -> None:
    """Errors at step K of every window (``obs``: 1 where the truth was measured): all values,
    measured values, per variable."""
    ev.scaled[k] = summary(pred, true)
    ev.n_windows[k] = len(stay)
    if not len(stay):
        return
    ev.errors[k] = patient_errors(pred, true, obs, seqs.subject_ids[stay])
    ev.observed[k] = {"mae": ev.errors[k].mae, "rmse": ev.errors[k].rmse}
    pred_phys, true_phys = pre.unscale_state(pred), pre.unscale_state(true)
    for j, row in enumerate(per_variable(pred_phys, true_phys, STATE_NAMES)):
        m = obs[:, j] > 0
        err = pred_phys[m, j] - true_phys[m, j]
        row["rmse_measured"] = float(np.sqrt(np.mean(err**2))) if m.any() else float("nan")
        row["mae_measured"] = float(np.mean(np.abs(err))) if m.any() else float("nan")
        row["n_measured"] = int(m.sum())
        ev.per_variable.append({"k": k, **row})


def evaluate_direct(
    direct: DirectRidge, seqs: StaySequences, pre: Preprocessor, ks: tuple[int, ...] = KS
) -> Evaluation:
    """The direct multi-horizon ridge on the same windows as :func:`evaluate`."""
    lo, hi = (b.numpy() for b in state_bounds(pre))
    state, inputs = pad(seqs.state), pad(seqs.inputs)
    ev = Evaluation(scaled={})
    for k in ks:
        pred, stay, start = direct.predict(seqs.inputs, k, (lo, hi))
        obs = inputs[stay, start + k, N_STATE : 2 * N_STATE]
        _score(ev, k, pred, state[stay, start + k], obs, stay, seqs, pre)
    return ev


def latency(forecaster, seqs: StaySequences, horizon: int = 5, repeats: int = 20) -> dict:
    """Median wall time of one Forecaster call: one history, and all histories at once."""
    if len(seqs) == 0:
        return {}
    b = len(seqs)
    st, iv = pad(seqs.raw_state), pad(seqs.interventions)
    lengths = np.array([len(s) for s in seqs.state])
    longest = int(np.argmax(lengths))
    i = slice(longest, longest + 1)  # the longest history, so no padding

    def timed(fn, repeats: int = repeats) -> float:
        fn()  # warm-up
        return float(np.median(timeit.repeat(fn, number=1, repeat=repeats)))

    one = timed(lambda: forecaster.forecast(st[i], iv[i], lengths[i], np.zeros((1, horizon, 3))))
    batch = timed(lambda: forecaster.forecast(st, iv, lengths, np.zeros((b, horizon, 3))), 5)
    return {
        "infer_latency_ms": one * 1e3,
        "infer_batch_latency_ms": batch * 1e3,
        "infer_batch_size": float(b),
        "infer_histories_per_s": b / batch if batch > 0 else float("nan"),
    }
