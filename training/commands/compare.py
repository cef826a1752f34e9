"""``icu-forecast compare``: side-by-side table of the latest runs (mean +- std over seeds)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", default="icu-forecast", help="MLflow experiment")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument("--models", nargs="+", default=None, help="labels to show, in order")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/compare.md"),
        help="Markdown output file (default outputs/compare.md)",
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from features.atomic import atomic_write_text
    from training import tracking
    from training.compare import SKILL_NOTE, latest_runs, table, to_markdown

    uri = tracking.require_store(args.tracking_uri)
    print(f"MLflow store: {tracking.describe(uri)}", file=sys.stderr)
    tracking.setup(uri, args.experiment)
    frame = table(latest_runs(args.experiment), args.models)
    t = Table(title=f"icu-forecast: test split, latest run per model and seed ({args.experiment})")
    for col in frame.columns:
        t.add_column(col, justify="left" if col == "model" else "right")
    for _, r in frame.iterrows():
        t.add_row(*[str(v) for v in r])
    Console(width=250).print(t)
    md = SKILL_NOTE + "Mean ± std over seeds.\n\n" + to_markdown(frame)
    atomic_write_text(args.out, md)
    print(f"written {args.out}")
    return 0
