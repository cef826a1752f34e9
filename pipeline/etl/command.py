"""``icu-forecast etl``: the CLI face of :func:`pipeline.etl.run_etl`."""

from __future__ import annotations

import argparse
import sys

from features.settings import settings_from_namespace


def configure(parser: argparse.ArgumentParser) -> None:
    # Flags default to None: only the flags given override environment and defaults.
    parser.add_argument("--mimic-dir", help="MIMIC-III tables (default: $MIMIC_DIR or the demo)")
    parser.add_argument("--out", help="output folder (default: data/processed)")
    parser.add_argument("--seed", type=int, help="seed of the split by patient (default 0)")
    parser.add_argument(
        "--max-stay-days", type=int, help="cut longer stays to their first N days (default 60)"
    )
    parser.add_argument("--threads", type=int, help="DuckDB / Arrow threads (default 2)")
    parser.add_argument("--memory-limit", help="DuckDB memory limit, e.g. 3GB")
    parser.add_argument("--temp-dir", help="scratch folder (default: beside --out)")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, help="progress display per table"
    )


def settings_from_args(args: argparse.Namespace):
    from pipeline.etl.settings import EtlSettings

    return settings_from_namespace(EtlSettings, args, "ETL")


def run(args: argparse.Namespace) -> int:
    from pipeline.etl.run import run_etl

    settings = settings_from_args(args)
    print(
        f"MIMIC-III tables: {settings.mimic_dir.resolve()}  output: {settings.out.resolve()}",
        file=sys.stderr,
    )
    result = run_etl(settings)
    c = result.counts
    print(
        f"wrote {result.out_dir}: {c['stays_kept']} stays kept of {c['icustays_rows']} "
        f"({c['stays_excluded']} excluded), {c['bins']} bins, {result.seconds:.1f} s"
    )
    return 0
