"""``icu-forecast dag run|status``: the whole pipeline as a cached DAG.

icu-forecast dag run                      # fetch -> etl -> train x4 -> compare -> promote
icu-forecast dag run --force etl          # re-run a step (and whatever its output changes)
icu-forecast dag run --until etl          # stop after a step
icu-forecast dag status                   # each step: done / stale / missing / failed, why
"""

from __future__ import annotations

import argparse
import sys

from features.errors import UserError
from features.settings import settings_from_namespace
from pipeline.dag.settings import PAPER_EPOCHS, DagSettings


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dag_command", metavar="ACTION", required=True)
    run = sub.add_parser(
        "run", help="run the steps whose inputs, params, code or libraries changed"
    )
    status = sub.add_parser("status", help="show each step as done / stale / missing, and why")
    for p in (run, status):
        p.add_argument("--mimic-dir", help="MIMIC-III tables (env MIMIC_DIR)")
        p.add_argument("--data-dir", help="ETL output and DAG state folder (default data)")
        p.add_argument("--tracking-uri", help="MLflow store (env MLFLOW_TRACKING_URI)")
        p.add_argument("--experiment", help="MLflow experiment (default icu-forecast)")
        p.add_argument("--models", help="comma-separated: cfc,gru,persistence,linear")
        p.add_argument("--epochs", type=int, help="maximum training epochs (default: the preset's)")
        p.add_argument(
            "--paper",
            action="store_true",
            help=f"train with the paper's recipe ({PAPER_EPOCHS} epochs, teacher-forced)",
        )
        p.add_argument("--seed", type=int)
        p.add_argument(
            "--cv",
            action=argparse.BooleanOptionalAction,
            help="also run the patient-grouped cross-validation (cv step; minutes)",
        )
        p.add_argument("--cv-folds", type=int, help="folds of the cv step (default 5)")
        p.add_argument("--cv-seeds", type=int, help="seeds of the cv step (default 3)")
    run.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STEP",
        help="re-run STEP even if unchanged (repeatable, comma lists, or 'all')",
    )
    run.add_argument("--until", metavar="STEP", help="run STEP and what it needs, then stop")


def settings_from_args(args: argparse.Namespace) -> DagSettings:
    if not getattr(args, "paper", False):
        return settings_from_namespace(DagSettings, args, "DAG")
    if args.epochs is not None and args.epochs != PAPER_EPOCHS:
        raise UserError("--paper and --epochs disagree; give one of them")
    return settings_from_namespace(DagSettings, args, "DAG", preset="paper")


def run(args: argparse.Namespace) -> int:
    from pipeline.dag.steps import build_dag
    from training.tracking import describe

    settings = settings_from_args(args)
    # Relative defaults (data, sqlite:///mlflow.db) depend on the folder it is started from.
    # On stderr: stdout stays the status table / step lines that scripts read.
    print(
        f"dag: data folder {settings.data_dir.resolve()}, MIMIC-III tables "
        f"{settings.mimic_dir.resolve()}, MLflow store {describe(settings.tracking_uri)}",
        file=sys.stderr,
    )
    if args.dag_command == "status":
        decisions = build_dag(settings, track=False).status()
        width = max(len(d.step) for d in decisions)
        for d in decisions:
            print(f"{d.step:<{width}}  {d.status:<8} {'; '.join(d.reasons)}")
        return 0
    dag = build_dag(settings, track=True)
    force = {f.strip() for spec in args.force for f in spec.split(",") if f.strip()}
    if "all" in force:
        force = set(dag.order)
    report = dag.run(force=force, until=args.until, dag_params=settings.model_dump(mode="json"))
    if not report.ok:
        print(
            f"dag: step(s) {', '.join(report.failed)} failed; fix the problem and run "
            "`icu-forecast dag run` again to resume from there"
        )
        return 1
    return 0
