"""Model registry: a ``champion`` alias per model family (``icu-forecast-<family>``), and the
overall champion copied to ``icu-forecast@champion``, what the service serves by default
(docs/training.md, "Champions and the served model").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from features.errors import UserError

CHAMPION = "champion"
SELECTION_METRIC = "val/rmse_measured_k5"
OVERALL = "icu-forecast"
NEURAL_FAMILIES = ("cfc", "gru", "lstm", "ltc", "cfc-ncp")


def registered_name(model: str) -> str:
    return f"icu-forecast-{model}"


def registered_families() -> list[str]:
    """Model families with a registered ``icu-forecast-<family>`` model."""
    from mlflow import MlflowClient

    prefix = registered_name("")
    return sorted(
        m.name.removeprefix(prefix)
        for m in MlflowClient().search_registered_models(f"name LIKE '{prefix}%'")
        if m.name.startswith(prefix)
    )


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


@dataclass
class OverallChampion:
    """The served model and what the choice rests on."""

    family: str
    name: str
    version: str
    run_id: str
    metric: float
    candidates: dict[str, Promotion]
    persistence: float | None
    message: str


def promote_overall(
    families: list[str] | tuple[str, ...], metric: str = SELECTION_METRIC
) -> OverallChampion:
    """``champion`` per family, then the best of them copied to ``icu-forecast@champion``.

    Chosen on validation patients only. The message says plainly whether any network beats
    persistence on that metric.
    """
    from mlflow import MlflowClient

    candidates = {f: promote(f, metric) for f in families}
    family, best = min(candidates.items(), key=lambda kv: kv[1].metric)
    client = MlflowClient()
    copied = client.copy_model_version(f"models:/{best.name}/{best.version}", OVERALL)
    client.set_registered_model_alias(OVERALL, CHAMPION, copied.version)
    client.set_model_version_tag(OVERALL, copied.version, "family", family)
    client.set_model_version_tag(OVERALL, copied.version, metric, f"{best.metric:.6g}")
    ref = candidates.get("persistence")
    nets = {f: p for f, p in candidates.items() if f in NEURAL_FAMILIES}
    if ref is None:
        message = f"{family} chosen ({metric} {best.metric:.4f}); persistence was not trained"
    elif not nets:
        message = f"{family} chosen ({metric} {best.metric:.4f}); no network was trained"
    else:
        beat = [f for f, p in nets.items() if p.metric < ref.metric]
        # The level forecaster is the networks' starting point, level-direct their forecast
        # with no network: beside them, they show what the networks add.
        shown = nets | {f: p for f, p in candidates.items() if f in ("level", "level-direct")}
        rel = ", ".join(f"{f} {p.metric / ref.metric:.3f}x" for f, p in shown.items())
        message = f"{family} chosen ({metric} {best.metric:.4f}); against persistence: {rel}" + (
            "" if beat else "; NO network beats persistence on validation"
        )
    return OverallChampion(
        family,
        OVERALL,
        str(copied.version),
        best.run_id,
        best.metric,
        candidates,
        ref.metric if ref else None,
        message,
    )
