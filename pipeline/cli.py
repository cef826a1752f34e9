"""The one console script, ``icu-forecast``, with a subcommand per job.

Each subcommand lives in the package that owns the job and is imported only when it runs, so
``icu-forecast etl`` never pays for importing torch or MLflow. A command module exposes
``configure(parser)`` (adds its flags) and ``run(args) -> int`` (its exit code).

Flags override environment variables, which override the embedded defaults: command modules
build their typed settings (pydantic-settings) from the flags that were actually given.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from features.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "etl": ("pipeline.etl.command", "MIMIC-III tables -> 12-hour bins, data card"),
    "train": ("training.commands.train", "train and evaluate one model, log it to MLflow"),
    "cv": ("training.commands.cv", "patient-grouped k-fold cross-validation against baselines"),
    "compare": ("training.commands.compare", "side-by-side table of the latest runs"),
    "promote": ("training.commands.promote", "set the 'champion' alias on the best version"),
    "serve": ("service.command", "run the forecast API (uvicorn)"),
    "dag": ("pipeline.dag.command", "run the whole pipeline as a cached DAG, or show status"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icu-forecast",
        description="ICU state forecasting with CfC and GRU dynamics models on MIMIC-III.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            importlib.import_module(module).configure(p)
    return parser


# The one log line format (the service's worker processes configure their logging with it too).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the chosen command's module: find the first non-flag word.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=LOG_FORMAT,
    )
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"icu-forecast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"icu-forecast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
