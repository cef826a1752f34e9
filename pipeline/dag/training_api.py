"""The DAG's calls into ``training``: train one model, compare runs, promote the champion.

Kept in one place so the step definitions do not depend on the training package's internals.

The DAG's own runs (parent + one per step) live in a separate experiment, ``<experiment>-dag``:
the training experiment then holds only training runs, which is what ``icu-forecast compare``
and the MLflow runs table expect. Lineage is kept with tags both ways (``dag.run_id`` /
``dag.step_run_id`` on the training run, ``train_run_id`` and a link on the step run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.dag.engine import StepContext
from pipeline.dag.settings import DagSettings

NEURAL = ("cfc", "gru")
# TrainConfig fields that only matter to gradient-trained models: changing them must not
# invalidate the baselines' train steps.
_NEURAL_ONLY = {
    *("preset", "objective", "rollout_k", "measured_only", "monitor"),  # objective
    *("epochs", "batch_size", "lr", "weight_decay", "grad_clip", "patience"),  # optimisation
    # architecture
    *("units", "layers", "mode", "backbone_units", "backbone_layers", "backbone_dropout"),
    *("mixed_memory", "cfc_impl", "ncp_output", "ncp_sparsity", "ode_unfolds"),
    *("accelerator", "devices", "strategy", "precision", "num_nodes", "num_workers"),  # Lightning
    *("checkpoint_dir", "resume"),  # checkpoints
}


def train_config(s: DagSettings, model: str, **overrides: Any):
    """The TrainConfig of one train step (ICU_TRAIN_* environment variables still apply)."""
    from training.config import TrainConfig

    given: dict[str, Any] = {
        "model": model,
        "data": s.etl_dir,
        "seed": s.seed,
        "tracking_uri": s.tracking_uri,
        "experiment": s.experiment,
        "checkpoint_dir": s.data_dir / "checkpoints",
    }
    if model in NEURAL:
        given["preset"] = s.preset
        if s.epochs is not None:
            given["epochs"] = s.epochs
    return TrainConfig(**(given | overrides))


def train_params(s: DagSettings, model: str) -> dict[str, Any]:
    """Every setting that decides a train step's result: the whole TrainConfig."""
    exclude = None if model in NEURAL else _NEURAL_ONLY
    return train_config(s, model).model_dump(mode="json", exclude=exclude)


def _record(result: Any) -> dict[str, Any]:
    from training.registry import registered_name

    return {
        "model": result.model,
        "label": result.label or result.model,
        "run_id": result.run_id,
        "model_name": registered_name(result.model),
        "version": result.registered_version,
        "metrics": {k: float(v) for k, v in result.metrics.items()},
    }


def train(
    s: DagSettings, model: str, ctx: StepContext | None = None, **overrides: Any
) -> dict[str, Any]:
    """Train one model; with ``ctx``, tag the training run with the DAG runs it belongs to."""
    from training.train import train_model

    result = train_model(train_config(s, model, **overrides))
    if result.run_id is None:
        raise RuntimeError(f"training {model} returned no MLflow run")
    if ctx is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(s.tracking_uri)
        tags = {"dag.step_run_id": ctx.child_run_id, "dag.run_id": ctx.parent_run_id}
        for tag, run_id in tags.items():
            if run_id:
                client.set_tag(result.run_id, tag, run_id)
    return _record(result)


def cross_validate(s: DagSettings, out: Path) -> dict[str, Any]:
    """The cv step: patient-grouped CV of the trained network families against baselines."""
    from training import tracking
    from training.commands.cv import run_and_log
    from training.cv import VARIANTS

    nets = [m for m in s.models if m in NEURAL]
    # The networks' train-step settings; each variant sets its own model, run_cv the seed.
    base = train_config(s, "cfc", register_model=False, plots=False)
    tracking.setup(s.tracking_uri, s.experiment)
    return run_and_log(base, {m: dict(VARIANTS[m]) for m in nets}, s.cv_folds, s.cv_seeds, out)


def missing_run(s: DagSettings, run_id: str | None) -> str | None:
    """Why a recorded training run is unusable (gone from the store), or None."""
    if not run_id:
        return "no MLflow run recorded"
    from training import tracking

    if why := tracking.missing_store(s.tracking_uri):
        return why
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(s.tracking_uri).get_run(run_id)
    except MlflowException:
        return f"MLflow run {run_id} not found in {s.tracking_uri}"
    if run.info.lifecycle_stage == "deleted":
        return f"MLflow run {run_id} was deleted"
    return None


def compare(s: DagSettings, records: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """training.compare's table over exactly the runs this DAG trained (not 'latest runs')."""
    import mlflow

    from training import tracking
    from training.compare import SKILL_NOTE, table, to_markdown

    tracking.setup(s.tracking_uri, s.experiment)
    exp = mlflow.get_experiment_by_name(s.experiment)
    ids = ", ".join(f"'{r['run_id']}'" for r in records)
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"attributes.run_id IN ({ids})")
    if len(runs) != len(records):
        found = set(runs["run_id"]) if len(runs) else set()
        lost = [r["run_id"] for r in records if r["run_id"] not in found]
        raise RuntimeError(f"runs {lost} not found in experiment {s.experiment!r}")
    label = {r["run_id"]: r["label"] for r in records}
    runs = runs.assign(label=runs["run_id"].map(label), seed=runs["params.seed"])
    frame = table(runs, [r["label"] for r in records])
    md = SKILL_NOTE + "\n\n" + to_markdown(frame)
    payload = {"runs": records, "table": frame.to_dict(orient="records")}
    return md, payload


def promote(s: DagSettings, payload: dict[str, Any]) -> dict[str, Any]:
    """'champion' on the best version of each trained family, and the overall champion
    (baselines included) as ``icu-forecast@champion``, which the service serves by default."""
    from training import tracking
    from training.registry import SELECTION_METRIC, promote_overall

    tracking.setup(s.tracking_uri, s.experiment)
    champ = promote_overall([r["model"] for r in payload["runs"]], SELECTION_METRIC)
    return {
        "metric": SELECTION_METRIC,
        "champions": {
            f: {"model_name": p.name, "version": p.version, "run_id": p.run_id, "value": p.metric}
            for f, p in champ.candidates.items()
        },
        "overall": {
            "family": champ.family,
            "model_name": champ.name,
            "version": champ.version,
            "run_id": champ.run_id,
            "value": champ.metric,
            "persistence_value": champ.persistence,
        },
        "message": champ.message,
    }
