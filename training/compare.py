"""Side-by-side table of the latest runs per model label, mean +- std over seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from features.errors import UserError

KS = (1, 2, 3, 5)
NOISE_SIGMA = "0.05"

# (column title, metric, format, scale)
COLUMNS: list[tuple[str, str, str, float]] = (
    [(f"RMSE K={k}", f"test/rmse_k{k}", ".4f", 1.0) for k in KS]
    + [(f"MAE K={k}", f"test/mae_k{k}", ".4f", 1.0) for k in KS]
    + [(f"RMSE measured K={k}", f"test/rmse_observed_k{k}", ".4f", 1.0) for k in (1, 5)]
    + [
        (
            f"noise {NOISE_SIGMA} K=1 (%)",
            f"noise/rel_degradation_k1_sigma{NOISE_SIGMA}",
            ".1f",
            100,
        ),
        (
            f"noise {NOISE_SIGMA} K=5 (%)",
            f"noise/rel_degradation_k5_sigma{NOISE_SIGMA}",
            ".1f",
            100,
        ),
        ("params", "n_params", ",.0f", 1.0),
        ("peak mem (MB)", "peak_mem_mb", ".0f", 1.0),
        ("peak mem delta (MB)", "peak_mem_delta_mb", ".0f", 1.0),
        ("train ex/s", "train_examples_per_s", ",.0f", 1.0),
        ("train steps/s", "train_steps_per_s", ".2f", 1.0),
        ("latency (ms)", "infer_latency_ms", ".2f", 1.0),
        ("val RMSE K=5", "val/rmse_k5", ".4f", 1.0),
    ]
)


def latest_runs(experiment: str) -> pd.DataFrame:
    """The newest finished run per (label, seed) of ``experiment``."""
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(
            f"MLflow experiment {experiment!r} not found at {mlflow.get_tracking_uri()}"
        )
    runs = mlflow.search_runs(
        [exp.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    if runs.empty:
        raise UserError(f"MLflow experiment {experiment!r} has no finished runs")
    label = runs.get("params.label", runs.get("params.model"))
    runs = runs.assign(label=label.fillna(runs["params.model"]), seed=runs["params.seed"])
    return runs.drop_duplicates(["label", "seed"], keep="first")


def _cell(values: np.ndarray, fmt: str, scale: float) -> str:
    values = values[np.isfinite(values)] * scale
    if len(values) == 0:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(values.mean(), fmt)} ± {format(values.std(ddof=1), fmt)}"


def table(runs: pd.DataFrame, labels: list[str] | None = None) -> pd.DataFrame:
    rows = []
    if labels:
        order = list(dict.fromkeys(labels))  # one row per label, however many seeds
    else:
        order = sorted(runs["label"].unique(), key=_label_order)
    for label in order:
        group = runs[runs["label"] == label]
        if group.empty:
            continue
        row = {"model": label, "seeds": str(len(group))}
        for title, metric, fmt, scale in COLUMNS:
            col = f"metrics.{metric}"
            vals = group[col].to_numpy(float) if col in group else np.array([math.nan])
            row[title] = _cell(vals, fmt, scale)
        rows.append(row)
    return pd.DataFrame(rows)


def _label_order(label: str) -> tuple[int, str]:
    rank = {"cfc": 0, "gru": 1, "persistence": 8, "linear": 9}
    return rank.get(label, 5), label


def to_markdown(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"
