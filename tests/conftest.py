"""Shared fixtures. Tests never reach the internet; the demo data is read where CI puts it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def mimic_dir() -> Path:
    """The MIMIC-III demo copy; a missing copy fails the test instead of skipping it."""
    path = Path(os.environ.get("MIMIC_DIR", REPO_ROOT.parent / "shared/data/mimic-iii-demo"))
    if not (path / "CHARTEVENTS.csv.gz").exists() and not (path / "CHARTEVENTS.csv").exists():
        pytest.fail(f"MIMIC-III demo not found at {path} (set MIMIC_DIR)")
    return path


@pytest.fixture()
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh SQLite MLflow store for one test, also exported as MLFLOW_TRACKING_URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri


@pytest.fixture(autouse=True)
def _fresh_mlflow_globals() -> Iterator[None]:
    """Forget MLflow's process-global active run and experiment around every test.

    ``mlflow.set_experiment`` keeps the experiment id in a module global *and* exports it as
    ``MLFLOW_EXPERIMENT_ID``; an id from an earlier test's store would point into the next
    test's fresh store, where it does not exist.
    """
    _reset_mlflow_globals()
    yield
    _reset_mlflow_globals()


def _reset_mlflow_globals() -> None:
    for name in (
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_RUN_ID",
        "MLFLOW_RUN_CONTEXT",
    ):
        os.environ.pop(name, None)
    if "mlflow" not in sys.modules:  # nothing to reset, and importing it costs seconds
        return
    import mlflow
    import mlflow.tracking.fluent as fluent

    while mlflow.active_run() is not None:
        mlflow.end_run()
    fluent._active_experiment_id = None
