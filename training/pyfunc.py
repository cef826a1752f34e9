"""The MLflow pyfunc: network + preprocessor + variable catalog, forecasting from raw history.

Input (``predict``): a long pandas DataFrame, one row per history bin per patient plus one row
per forecast bin with the planned interventions:

=================  ======  ====================================================================
column             type    meaning
=================  ======  ====================================================================
``patient_id``     string  groups the rows of one patient (any label)
``kind``           string  ``history`` or ``plan``
``step``           long    history: bin index 0..n-1 (12-hour bins, oldest first);
                           plan: forecast bin 0..H-1 (0 = the bin right after the history)
18 state columns   double  bin means in physical units (``features.catalog``), NaN / null =
                           not measured; ignored on plan rows
3 intervention     double  physical units, NaN / null = none; on a plan row, what is planned
columns                    during that forecast bin
=================  ======  ====================================================================

The horizon H of a patient is its number of plan rows (at least one). Output: one row per
patient and forecast bin: ``patient_id``, ``step`` (1..H, bins after the last history bin) and
the 18 state variables in physical units; then, when the model carries a conformal
calibration (docs/intervals.md), the prediction interval of every variable at each level:
``{variable}_lower_{level}`` and ``{variable}_upper_{level}`` (e.g. ``heart_rate_lower_0.8``),
the same numbers the service returns as ``intervals``. The levels are the calibration's
defaults (0.8 and 0.95), or the ``interval_levels`` param (a list of levels in (0, 1); an
empty list gives none). See :meth:`Forecaster.forecast` for which planned interventions reach
which step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from features.catalog import INTERVENTION_NAMES, STATE_NAMES, catalog_dict, catalog_version
from features.errors import UserError
from features.preprocess import Preprocessor
from training.conformal import Calibration, check_levels, level_label
from training.data import pad
from training.forecaster import Forecaster
from training.models import ModelConfig, build_model

KEY_COLUMNS = ("patient_id", "kind", "step")


class ForecastInputError(UserError, ValueError):
    """A pyfunc input frame that does not follow the documented long format."""


CALIBRATION_FILE = "calibration.json"
LEVELS_PARAM = "interval_levels"
PACKAGES = ("torch", "ncps", "mlflow", "pandas", "numpy", "scikit-learn")  # pinned for the pyfunc


def save_model_dir(
    path: Path,
    model: torch.nn.Module,
    cfg: ModelConfig,
    pre: Preprocessor,
    meta: dict,
    calibration: Calibration | None = None,
) -> Path:
    """Everything the pyfunc needs, as plain files (no pickled classes); with ``calibration``
    its sorted conformal scores too (JSON floats round-trip exactly)."""
    path.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path / "model.pt")
    (path / "config.json").write_text(
        json.dumps({"model_config": cfg.to_dict(), **meta}, indent=1, default=str)
    )
    pre.save(path / "preprocessor")
    (path / "catalog.json").write_text(json.dumps(catalog_dict(), indent=1, default=str))
    if calibration is not None:
        (path / CALIBRATION_FILE).write_text(json.dumps(calibration.to_dict()))
    return path


def load_forecaster(path: Path) -> Forecaster:
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("catalog_version") not in (None, catalog_version()):
        raise UserError(
            f"{path}: model built for variable catalog {config['catalog_version']!r}, "
            f"this code has {catalog_version()!r}"
        )
    cfg = ModelConfig.from_dict(config["model_config"])
    model = build_model(cfg)
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    cal_file = path / CALIBRATION_FILE
    # Models logged before intervals existed have none; they still forecast.
    calibration = (
        Calibration.from_dict(json.loads(cal_file.read_text())) if cal_file.exists() else None
    )
    return Forecaster(
        model,
        Preprocessor.load(path / "preprocessor"),
        model_name=cfg.model,
        config=config,
        data_checksum=config.get("data_checksum"),
        calibration=calibration,
    )


def frame_to_arrays(
    frame: pd.DataFrame,
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Long frame -> patient ids, state (B,T,18), interventions (B,T,3), lengths, planned."""
    missing = [c for c in (*KEY_COLUMNS, *STATE_NAMES, *INTERVENTION_NAMES) if c not in frame]
    if missing:
        raise ForecastInputError(f"input frame: missing columns {missing}")
    kinds = set(frame["kind"].astype(str))
    if not kinds <= {"history", "plan"}:
        raise ForecastInputError(
            f"input frame: column 'kind' has values {sorted(kinds - {'history', 'plan'})}; "
            "expected 'history' or 'plan'"
        )
    frame = frame.assign(patient_id=frame["patient_id"].astype(str), kind=frame["kind"].astype(str))
    ids = list(dict.fromkeys(frame["patient_id"]))
    hist, plan = (
        {p: g.sort_values("step") for p, g in frame[frame["kind"] == kind].groupby("patient_id")}
        for kind in ("history", "plan")
    )
    for p in ids:
        for name, rows, why in (("history", hist, ""), ("plan", plan, " (horizon 0)")):
            if p not in rows:
                raise ForecastInputError(f"input frame: patient {p!r} has no {name} rows{why}")
            steps = rows[p]["step"].to_numpy()
            if not np.array_equal(steps, np.arange(len(steps))):
                raise ForecastInputError(
                    f"input frame: patient {p!r} {name} steps must be 0..{len(steps) - 1}, got "
                    f"{steps.tolist()}"
                )

    def values(rows: dict[str, pd.DataFrame], names: tuple[str, ...]) -> np.ndarray:
        return pad([rows[p][list(names)].to_numpy(np.float64, na_value=np.nan) for p in ids])

    lengths = np.array([len(hist[p]) for p in ids], dtype=np.int64)
    planned = values(plan, INTERVENTION_NAMES)
    return ids, values(hist, STATE_NAMES), values(hist, INTERVENTION_NAMES), lengths, planned


def interval_column(variable: str, bound: str, level: float) -> str:
    """``heart_rate``, ``lower``, 0.8 -> ``heart_rate_lower_0.8`` (the predict frame's band
    columns)."""
    return f"{variable}_{bound}_{level_label(level)}"


def predict_frame(
    forecaster: Forecaster, frame: pd.DataFrame, levels: Sequence[float] | None = None
) -> pd.DataFrame:
    """The forecast of every patient in ``frame``, with its conformal bands at ``levels``
    (None: the calibration's defaults; none when the model has no calibration)."""
    ids, state, iv, lengths, planned = frame_to_arrays(frame)
    plan_ids = frame.loc[frame["kind"].astype(str) == "plan", "patient_id"].astype(str)
    h = plan_ids.value_counts()[ids].to_numpy()
    out = forecaster.forecast(state, iv, lengths, planned)
    keep = np.arange(out.shape[1]) < h[:, None]  # (B, H_max): each patient's own horizon
    columns: dict[str, object] = {
        "patient_id": np.repeat(np.array(ids, dtype=object), h),
        "step": np.concatenate([np.arange(1, n + 1, dtype=np.int64) for n in h]),
    }
    columns |= dict(zip(STATE_NAMES, out[keep].T, strict=True))
    if forecaster.calibration is not None:
        wanted = forecaster.calibration.levels if levels is None else tuple(levels)
        bands = forecaster.intervals(out, state, lengths, wanted) if wanted else {}
        for level, (lo, hi) in bands.items():
            for bound, arr in (("lower", lo), ("upper", hi)):
                cols = (interval_column(n, bound, level) for n in STATE_NAMES)
                columns |= dict(zip(cols, arr[keep].T, strict=True))
    return pd.DataFrame(columns)


class ForecastModel(mlflow.pyfunc.PythonModel):
    """Loaded by ``mlflow.pyfunc.load_model``; ``.forecaster`` is the Forecaster."""

    forecaster: Forecaster | None = None

    def load_context(self, context) -> None:  # noqa: ANN001 - mlflow's PythonModelContext
        self.forecaster = load_forecaster(Path(context.artifacts["model_dir"]))

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        return predict_frame(self.forecaster, model_input, _levels_param(params))


def _levels_param(params: dict | None) -> tuple[float, ...] | None:
    """The ``interval_levels`` param: None (the defaults) or levels each in (0, 1). MLflow
    checks its type against the logged signature; the range is the calibration's rule."""
    levels = (params or {}).get(LEVELS_PARAM)
    if levels is None:
        return None
    out = tuple(dict.fromkeys(float(v) for v in np.atleast_1d(levels)))
    try:
        check_levels(out)
    except ValueError as exc:
        raise ForecastInputError(f"param {LEVELS_PARAM}: {exc}") from exc
    return out


def synthetic_input_example() -> pd.DataFrame:
    """Two made-up patients (values invented, no patient data): 3 history bins, 2 plan rows."""
    typical = [88, 118, 62, 80, 19, 37.1, 96, 13, 140, 1.1, 22, 10.5, 10.2, 210, 139, 4.0, 24, 1.6]
    rows = []
    for p, drift in (("example-1", 0.0), ("example-2", 3.0)):
        for b in range(3):
            state = np.array(typical, dtype=np.float64) + drift * b
            if b > 0:  # labs are not measured in every bin
                state[9:] = np.nan
            given = (0.5 if b == 2 else np.nan, 1.0 if b else np.nan, 750.0 if b else np.nan)
            rows.append([p, "history", b, *state, *given])
        rows += [[p, "plan", k, *[np.nan] * len(STATE_NAMES), 0.0, 1.0, 500.0] for k in range(2)]
    frame = pd.DataFrame(rows, columns=[*KEY_COLUMNS, *STATE_NAMES, *INTERVENTION_NAMES])
    return frame.astype({"patient_id": "str", "kind": "str", "step": "int64"})


def log_pyfunc(model_dir: Path, registered_name: str | None, forecaster: Forecaster):
    """Log (and register) the pyfunc under the active run; returns MLflow's ModelInfo."""
    from importlib.metadata import version

    from mlflow.models import infer_signature

    example = synthetic_input_example()
    params = None
    if forecaster.calibration is not None:
        params = {LEVELS_PARAM: [float(lv) for lv in forecaster.calibration.levels]}
    signature = infer_signature(example, predict_frame(forecaster, example), params)
    root = Path(__file__).resolve().parents[1]
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=ForecastModel(),
        artifacts={"model_dir": str(model_dir)},
        signature=signature,
        input_example=example,
        registered_model_name=registered_name,
        code_paths=[str(root / "training"), str(root / "features")],
        pip_requirements=[f"{pkg}=={version(pkg)}" for pkg in PACKAGES],
    )
