"""``icu-forecast promote``: alias 'champion' on the best version by validation RMSE at K=5."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="cfc", help="model family (default cfc)")
    parser.add_argument("--metric", default=None, help="selection metric (default val/rmse_k5)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")


def run(args: argparse.Namespace) -> int:
    from training import tracking
    from training.registry import SELECTION_METRIC, promote

    tracking.setup(args.tracking_uri)
    p = promote(args.model, args.metric or SELECTION_METRIC)
    print(
        f"{p.name} version {p.version} (run {p.run_id}) is now 'champion': "
        f"{args.metric or SELECTION_METRIC} = {p.metric:.4f}"
    )
    return 0
