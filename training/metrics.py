"""MAE / RMSE / R2 of forecasts, overall (scaled space) and per variable (physical units)."""

from __future__ import annotations

import numpy as np


def r2_per_variable(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Coefficient of determination of each column of (n, v) arrays (NaN for constant truth)."""
    sse = np.sum((pred - true) ** 2, axis=0)
    sst = np.sum((true - true.mean(axis=0)) ** 2, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - sse / sst, np.nan)


def summary(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MAE, RMSE (over every value) and R2 (mean over variables) of (..., v) arrays."""
    if pred.size == 0:
        return {"mae": float("nan"), "rmse": float("nan"), "r2": float("nan")}
    err = pred - true
    # R2 averaged over variables (scikit-learn's ``uniform_average``), skipping constant ones.
    r2 = r2_per_variable(pred.reshape(-1, pred.shape[-1]), true.reshape(-1, true.shape[-1]))
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "r2": float(np.nanmean(r2)) if np.isfinite(r2).any() else float("nan"),
    }


def per_variable(pred: np.ndarray, true: np.ndarray, names: tuple[str, ...]) -> list[dict]:
    """One row per variable: MAE, RMSE and R2 of (n, v) arrays (NaN where there are none)."""
    p, t = pred.reshape(-1, len(names)), true.reshape(-1, len(names))
    err = p - t if len(p) else np.full((1, len(names)), np.nan)
    mae, rmse = np.mean(np.abs(err), axis=0), np.sqrt(np.mean(err**2, axis=0))
    r2s = r2_per_variable(p, t) if len(p) else np.full(len(names), np.nan)
    return [
        {"variable": n, "mae": float(mae[j]), "rmse": float(rmse[j]), "r2": float(r2s[j])}
        for j, n in enumerate(names)
    ]
