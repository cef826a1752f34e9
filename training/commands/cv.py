"""``icu-forecast cv``: patient-grouped k-fold cross-validation of models against baselines."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from training.commands.train import add_train_flags

if TYPE_CHECKING:
    from training.config import TrainConfig


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--folds", type=int, default=5, help="folds (default 5)")
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds 0..N-1: fold assignment and training (3)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["cfc", "gru"],
        help="named variants (cfc gru lstm ltc cfc-ncp cfc-small cfc-paper gru-paper) or "
        "label=model:key=value,... (default: cfc gru); persistence, the one-step ridge and "
        "the direct K-step ridge are always scored on the same windows",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/cv"), help="report folder (default outputs/cv)"
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="also write the report into this Markdown file, with the command that made it "
        "(e.g. docs/results.md)",
    )
    parser.add_argument(
        "--section",
        default="Cross-validated results",
        help="with --markdown: the '## ' section of the file to write or replace (other "
        "sections are kept)",
    )
    add_train_flags(parser, exclude={"model", "seed", "label", "folds", "fold", "cv-seed"})


def run_and_log(
    base: TrainConfig, variants: dict[str, dict], folds: int, seeds: int, out: Path
) -> dict:
    """One parent MLflow run (in the experiment already set up) around :func:`run_cv`: the
    report written to ``out`` and logged with its per-model metrics. Also the DAG's cv step."""
    import mlflow

    from training.cv import REPORT_FILES, run_cv, write_report

    labels = list(variants)
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1 :]]
    # Does a network add anything to the strongest baselines? Paired, on the same windows.
    pairs += [(a, b) for a in labels for b in ("level", "direct", "level-direct")]
    with mlflow.start_run(run_name=f"cv-{folds}fold-{seeds}seeds", tags={"kind": "cv"}) as parent:
        res = run_cv(base, variants, folds, tuple(range(seeds)), parent.info.run_id)
        report = write_report(res, out, pairs)
        # The report's own files, not the folder: --out may hold other things, even the
        # tracking store itself (copying mlruns into itself never ends).
        for name in REPORT_FILES:
            mlflow.log_artifact(str(out / name), artifact_path="cv")
        for r in report["rows"]:
            prefix, k = f"cv/{r['model']}/", r["k"]
            metrics = {
                f"{prefix}rmse_measured_k{k}": r["rmse_measured"],
                f"{prefix}skill_k{k}": r["skill"],
            }
            for name in ("coverage", "width"):
                for level, v in (r[name] or {}).items():
                    if v is not None:
                        metrics[f"{prefix}{name}_k{k}_l{level}"] = v
            mlflow.log_metrics(metrics)
    return report


def run(args: argparse.Namespace) -> int:
    from features.errors import UserError
    from features.settings import settings_from_namespace
    from training import tracking
    from training.config import TrainConfig
    from training.cv import parse_variant

    if args.folds < 2:
        raise UserError(f"--folds must be at least 2, got {args.folds}")
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    try:
        variants = dict(parse_variant(m) for m in args.models)
    except ValueError as exc:
        raise UserError(f"--models: {exc}") from exc
    base = settings_from_namespace(TrainConfig, args, "cv", register_model=False, plots=False)
    tracking.setup(base.tracking_uri, base.experiment)
    code = tracking.code_version()  # the code that runs, not the code when the report is written
    run_and_log(base, variants, args.folds, args.seeds, args.out)
    if args.markdown is not None:
        import shlex
        import sys

        from training.cv import replace_section

        command = "icu-forecast " + shlex.join(sys.argv[1:])
        body = f"Written by `{command}` (code {code}).\n\n" + (args.out / "report.md").read_text()
        replace_section(args.markdown, args.section, body)
    print((args.out / "report.md").read_text())
    print(f"wrote {args.out}/report.json, report.md, skill_vs_k.png")
    return 0
