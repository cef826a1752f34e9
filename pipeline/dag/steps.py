"""The icu-forecast pipeline as DAG steps: fetch -> etl -> train (x4) -> compare -> promote.

Every step writes its result to a file under ``<data_dir>/dag`` (train steps: the MLflow run id,
registered version and metrics), so the next step's inputs are content-hashed files like any
other and the cache needs nothing from MLflow to decide. A train step whose recorded run has
disappeared from the MLflow store (a deleted ``mlflow.db``) is stale, not done.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from features.atomic import atomic_write_text
from pipeline.dag import training_api
from pipeline.dag.engine import Dag, Step, StepContext, StepResult
from pipeline.dag.fetch import fetch_demo, has_mimic_tables
from pipeline.dag.settings import DagSettings

TRAIN_CODE = ("training", "features")


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def fetch_step(s: DagSettings) -> Step:
    def action(ctx: StepContext) -> StepResult:
        result = fetch_demo(s.mimic_dir, url=s.fetch_url, expected_sha256=s.fetch_sha256)
        return StepResult(
            metrics={"files": result.files},
            summary={"zip_sha256": result.zip_sha256, "dest": str(result.dest)},
            message=f"{result.files} files into {result.dest}"
            if result.downloaded
            else result.reason,
        )

    def not_needed() -> str | None:
        return f"{s.mimic_dir} holds MIMIC tables" if has_mimic_tables(s.mimic_dir) else None

    return Step(
        "fetch",
        action,
        outputs=(s.mimic_dir,),
        params={"url": s.fetch_url, "sha256": s.fetch_sha256},
        code=("pipeline.dag.fetch",),
        not_needed=not_needed,
    )


def _etl_settings(s: DagSettings):
    from pipeline.etl import EtlSettings

    return EtlSettings(mimic_dir=s.mimic_dir, out=s.etl_dir, seed=s.seed, progress=False)


def etl_step(s: DagSettings) -> Step:
    def action(ctx: StepContext) -> StepResult:
        from pipeline.etl import run_etl

        result = run_etl(_etl_settings(s))
        return StepResult(
            metrics={k: float(v) for k, v in result.counts.items()},
            summary={"bins_sha256": result.bins_sha256, "counts": result.counts},
            tags={"bins_sha256": result.bins_sha256},
            message=", ".join(f"{k}={v}" for k, v in result.counts.items()),
        )

    # Every ETL setting that shapes the output is a parameter, including ICU_ETL_* overrides.
    etl = _etl_settings(s).model_dump(mode="json", exclude={"mimic_dir", "out", "progress"})
    return Step(
        "etl",
        action,
        needs=("fetch",),
        inputs=(s.mimic_dir,),
        outputs=(s.etl_dir / "bins.parquet", s.etl_dir / "data_card.json"),
        params=etl,
        code=("pipeline.etl", "features"),
    )


def train_step(s: DagSettings, model: str) -> Step:
    out = s.dag_dir / f"train_{model}.json"

    def action(ctx: StepContext) -> StepResult:
        record = training_api.train(s, model, ctx)
        _write_json(out, record)
        return StepResult(
            metrics=record["metrics"],
            summary={k: record[k] for k in ("run_id", "model_name", "version")},
            tags={
                "train_run_id": record["run_id"],
                "model_version": f"{record['model_name']}/{record['version']}",
                "mlflow.note.content": f"Training run: {record['run_id']} "
                f"(experiment {s.experiment}), registered as "
                f"{record['model_name']} version {record['version']}",
            },
            message=f"run {record['run_id']}, {record['model_name']} v{record['version']}, "
            f"test skill K=5 {record['metrics'].get('test/skill_k5', float('nan')):+.3f}",
        )

    def run_exists() -> str | None:  # asked only while ``out`` exists
        return training_api.missing_run(s, _read_json(out).get("run_id"))

    return Step(
        f"train_{model}",
        action,
        needs=("etl",),
        inputs=(s.etl_dir,),
        outputs=(out,),
        params=training_api.train_params(s, model),
        code=TRAIN_CODE,
        verify=run_exists,
    )


def compare_step(s: DagSettings, train_steps: list[Step]) -> Step:
    md = s.dag_dir / "comparison.md"
    js = s.dag_dir / "comparison.json"

    def action(ctx: StepContext) -> StepResult:
        records = [_read_json(p) for st in train_steps for p in st.outputs]
        table, payload = training_api.compare(s, records)
        atomic_write_text(md, table + "\n")
        _write_json(js, payload)
        ctx.echo(table)
        return StepResult(summary={"runs": [r["run_id"] for r in records]})

    return Step(
        "compare",
        action,
        needs=tuple(st.name for st in train_steps),
        inputs=tuple(p for st in train_steps for p in st.outputs),
        outputs=(md, js),
        code=TRAIN_CODE,
    )


def promote_step(s: DagSettings, compare: Step) -> Step:
    out = s.dag_dir / "champion.json"
    from training.registry import SELECTION_METRIC

    def action(ctx: StepContext) -> StepResult:
        record = training_api.promote(s, _read_json(s.dag_dir / "comparison.json"))
        _write_json(out, record)
        champions = record["champions"]
        overall = record["overall"]
        ctx.echo(f"served by default: {overall['model_name']}@champion: {record['message']}")
        return StepResult(
            summary=record,
            tags={
                f"champion.{m}": f"{c['model_name']}/{c['version']}" for m, c in champions.items()
            }
            | {"champion": f"{overall['family']} ({overall['model_name']}/{overall['version']})"},
            message=record["message"],
        )

    return Step(
        "promote",
        action,
        needs=(compare.name,),
        inputs=(s.dag_dir / "comparison.json",),
        outputs=(out,),
        params={"metric": SELECTION_METRIC, "alias": "champion"},
        code=TRAIN_CODE,
    )


def cv_step(s: DagSettings) -> Step:
    out = s.dag_dir / "cv"

    def action(ctx: StepContext) -> StepResult:
        report = training_api.cross_validate(s, out)
        ctx.echo((out / "report.md").read_text())
        return StepResult(
            metrics={
                f"cv/{r['model']}/skill_k{r['k']}": r["skill"]
                for r in report["rows"]
                if r["model"] != report["reference"]
            },
            message=f"{out / 'report.md'} ({report['seconds'] / 60:.1f} min)",
        )

    params = training_api.train_params(s, "cfc") | {
        "folds": s.cv_folds,
        "seeds": s.cv_seeds,
        "models": [m for m in s.models if m in training_api.NEURAL],
    }
    return Step(
        "cv",
        action,
        needs=("etl",),
        inputs=(s.etl_dir,),
        outputs=(out / "report.json", out / "report.md"),
        params=params,
        code=TRAIN_CODE,
    )


def build_dag(s: DagSettings, track: bool = True, echo: Callable[[str], None] = print) -> Dag:
    trains = [train_step(s, m) for m in s.models]
    compare = compare_step(s, trains)
    steps = [fetch_step(s), etl_step(s), *trains, compare, promote_step(s, compare)]
    steps += [cv_step(s)] if s.cv else []
    tracker = None
    if track:
        from pipeline.dag.tracking import MlflowTracker

        # The DAG's parent and step runs, kept apart from the training runs.
        tracker = MlflowTracker(s.tracking_uri, f"{s.experiment}-dag", (s.experiment,))
    return Dag(steps, s.dag_dir / "state.json", tracker=tracker, echo=echo)
