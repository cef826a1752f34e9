"""``icu-forecast promote``: 'champion' per family and overall, by validation error at K=5."""

from __future__ import annotations

import argparse
import sys

from training.registry import SELECTION_METRIC


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="model families to choose from (default: every registered icu-forecast-* family)",
    )
    parser.add_argument("--metric", default=SELECTION_METRIC, help="selection metric (%(default)s)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")


def run(args: argparse.Namespace) -> int:
    from features.errors import UserError
    from training import tracking
    from training.registry import promote_overall, registered_families

    uri = tracking.require_store(args.tracking_uri)
    print(f"MLflow store: {tracking.describe(uri)}", file=sys.stderr)
    tracking.setup(uri)
    families = args.models or registered_families()
    if not families:
        raise UserError(f"no registered icu-forecast-* model in {uri}; train one first")
    champ = promote_overall(families, args.metric)
    for p in sorted(champ.candidates.values(), key=lambda p: p.metric):
        print(f"{p.name}@champion = v{p.version} ({args.metric} {p.metric:.4f})")
    print(f"{champ.name}@champion = v{champ.version}: {champ.message}")
    return 0
