"""Side-by-side table of the latest runs per model label, mean +- std over seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from features.errors import UserError

KS = (1, 2, 3, 5)
SKILL_NOTE = (
    "Test split. Skill = 1 - RMSE / RMSE of persistence on the same windows, over measured "
    "target values at the K-th step of closed-loop K-step rollouts, with its 95% paired "
    "bootstrap interval over patients (a single run). RMSE in scaled (min-max) units; "
    "'all' = over every value including imputed ones (the paper's metric); noise = RMSE "
    "increase at sigma 0.05. Intervals: empirical coverage (%) of the conformal band at "
    "level L over measured values at K=5 and its mean width in scaled units (the persistence "
    "row is the same recipe applied to persistence). "
)
NOISE = "0.05"

# (column title, metric, format, scale), after the skill columns (see _skill_cell).
COLUMNS: list[tuple[str, str, str, float]] = [
    *((f"RMSE measured K={k}", f"test/rmse_measured_k{k}", ".4f", 1.0) for k in KS),
    *((f"RMSE all K={k}", f"test/rmse_k{k}", ".4f", 1.0) for k in (1, 5)),
    *(
        col
        for lv in ("0.8", "0.95")
        for col in (
            (f"coverage {lv} K=5 (%)", f"test/coverage_k5_l{lv}", ".1f", 100),
            (f"width {lv} K=5", f"test/width_k5_l{lv}", ".3f", 1.0),
        )
    ),
    *(
        (f"noise {NOISE} K={k} (%)", f"noise/rel_degradation_k{k}_sigma{NOISE}", ".1f", 100)
        for k in (1, 5)
    ),
    ("params", "n_params", ",.0f", 1.0),
    ("peak mem (MB)", "peak_mem_mb", ".0f", 1.0),
    ("peak mem delta (MB)", "peak_mem_delta_mb", ".0f", 1.0),
    ("train ex/s", "train_examples_per_s", ",.0f", 1.0),
    ("train steps/s", "train_steps_per_s", ".2f", 1.0),
    ("latency (ms)", "infer_latency_ms", ".2f", 1.0),
    ("val RMSE measured K=5", "val/rmse_measured_k5", ".4f", 1.0),
]


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


def _cell(values: np.ndarray, fmt: str, scale: float, sd_fmt: str | None = None) -> str:
    """One run's value, or mean ± sample std over seeds (``sd_fmt``: the std's format)."""
    values = values[np.isfinite(values)] * scale
    if len(values) == 0:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(values.mean(), fmt)} ± {format(values.std(ddof=1), sd_fmt or fmt)}"


def table(runs: pd.DataFrame, labels: list[str] | None = None) -> pd.DataFrame:
    rows = []
    # One row per label, however many seeds.
    order = dict.fromkeys(labels) if labels else sorted(runs["label"].unique(), key=_label_order)
    for label in order:
        group = runs[runs["label"] == label]
        if group.empty:
            continue
        row = {"model": label, "seeds": str(len(group))}
        for k in KS:
            row[f"skill K={k} (%)"] = _skill_cell(group, k)
        for title, metric, fmt, scale in COLUMNS:
            col = f"metrics.{metric}"
            vals = group[col].to_numpy(float) if col in group else np.array([math.nan])
            row[title] = _cell(vals, fmt, scale)
        rows.append(row)
    return pd.DataFrame(rows)


def _skill_cell(group: pd.DataFrame, k: int) -> str:
    """Skill against persistence on the same test windows, with its 95% patient-bootstrap
    interval (one run), or mean ± std over seeds."""
    col = f"metrics.test/skill_k{k}"
    if col not in group:
        return "-"
    vals = group[col].to_numpy(float)
    if len(group) == 1 and np.isfinite(vals[0]):
        lo, hi = (group.get(f"{col}_{b}", pd.Series([math.nan])).iloc[0] for b in ("lo", "hi"))
        return f"{100 * vals[0]:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return _cell(vals, "+.1f", 100, ".1f")


def _label_order(label: str) -> tuple[int, str]:
    rank = {"cfc": 0, "gru": 1, "level-direct": 6, "level": 7, "linear": 8, "persistence": 9}
    return rank.get(label, 5), label


def markdown_table(header: list[str], rows: list[list[object]], left: int = 1) -> list[str]:
    """The lines of a Markdown table: the first ``left`` columns plain, the others right-aligned."""

    def line(cells: list[object]) -> str:
        return "| " + " | ".join(map(str, cells)) + " |"

    return [line(header), "|" + "---|" * left + "---:|" * (len(header) - left), *map(line, rows)]


def to_markdown(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    return "\n".join(markdown_table(cols, frame.to_numpy().tolist(), len(cols))) + "\n"
