"""``icu-forecast etl``: the CLI face of :func:`pipeline.etl.run_etl`."""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from features.errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    # Flags default to None: only the flags given override environment and defaults.
    parser.add_argument("--mimic-dir", help="MIMIC-III tables (default: $MIMIC_DIR or the demo)")
    parser.add_argument("--out", help="output folder (default: data/processed)")
    parser.add_argument("--seed", type=int, help="split and imputer seed (default 0)")
    parser.add_argument("--threads", type=int, help="DuckDB / Arrow threads (default 2)")
    parser.add_argument("--memory-limit", help="DuckDB memory limit, e.g. 3GB")
    parser.add_argument("--temp-dir", help="scratch folder (default: beside --out)")
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const=False,
        default=None,
        help="no progress display",
    )


def settings_from_args(args: argparse.Namespace):
    from pipeline.etl.settings import EtlSettings

    given = {
        k: v
        for k, v in {
            "mimic_dir": args.mimic_dir,
            "out": args.out,
            "seed": args.seed,
            "threads": args.threads,
            "memory_limit": args.memory_limit,
            "temp_dir": args.temp_dir,
            "progress": args.progress,
        }.items()
        if v is not None
    }
    try:
        return EtlSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise UserError(f"invalid ETL settings: {problems}") from exc


def run(args: argparse.Namespace) -> int:
    from pipeline.etl.run import run_etl

    result = run_etl(settings_from_args(args))
    c = result.counts
    print(
        f"wrote {result.out_dir}: {c['stays_kept']} stays kept of {c['icustays_rows']} "
        f"({c['stays_excluded']} excluded), {c['bins']} bins, {result.seconds:.1f} s"
    )
    return 0
