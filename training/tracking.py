"""MLflow location and small logging helpers."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "icu-forecast"


def tracking_uri(explicit: str | None = None) -> str:
    """An explicit URI, else ``MLFLOW_TRACKING_URI``, else the embedded SQLite store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def setup(uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow (tracking and registry) at ``uri`` and select the experiment."""
    import mlflow

    resolved = tracking_uri(uri)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or resolved)
    location = artifact_location(resolved)
    if location is not None and mlflow.get_experiment_by_name(experiment) is None:
        from mlflow.exceptions import MlflowException

        # A concurrent run may create it meanwhile; set_experiment below then just selects it.
        with contextlib.suppress(MlflowException):
            mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    return resolved


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go to ``mlruns/`` next to the database file.

    MLflow's default (``./mlruns`` in the current directory) would scatter the artifacts of a
    temporary store into whatever folder a run starts from.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.resolve().parent / "mlruns").as_uri()


def code_version() -> str:
    """The git commit of the code (``+dirty`` with local changes), else the package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if rev.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=5,
            )
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("icu-forecast")
    except PackageNotFoundError:
        return "unknown"
