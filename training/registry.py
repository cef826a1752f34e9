"""Model registry: names per model family and the 'champion' alias."""

from __future__ import annotations

import math
from dataclasses import dataclass

from features.errors import UserError

CHAMPION = "champion"
SELECTION_METRIC = "val/rmse_k5"


def registered_name(model: str) -> str:
    return f"icu-forecast-{model}"


@dataclass
class Promotion:
    name: str
    version: str
    run_id: str
    metric: float


def promote(model: str = "cfc", metric: str = SELECTION_METRIC) -> Promotion:
    """Set ``champion`` on the version of ``icu-forecast-<model>`` with the lowest ``metric``.

    Chosen on the validation split, never on test. Ties go to the newest version.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    name = registered_name(model)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        raise UserError(f"registered model {name!r}: {exc}") from exc
    if not versions:
        raise UserError(f"registered model {name!r} has no versions; train --model {model} first")
    best: Promotion | None = None
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if not mv.run_id:
            continue
        value = client.get_run(mv.run_id).data.metrics.get(metric)
        if value is None or not math.isfinite(value):
            continue
        if best is None or value < best.metric:
            best = Promotion(name, str(mv.version), mv.run_id, float(value))
    if best is None:
        raise UserError(f"no version of {name!r} has a finite metric {metric!r}")
    client.set_registered_model_alias(name, CHAMPION, best.version)
    return best
