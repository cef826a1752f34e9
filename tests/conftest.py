"""Shared fixtures. Tests never reach the internet; the demo data is read where CI puts it."""

from __future__ import annotations

import os
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
    import mlflow.tracking.fluent as fluent

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    # MLflow keeps the active experiment id in process-global state; an id from an earlier
    # test's store would point into this fresh store, where it does not exist.
    while mlflow.active_run() is not None:
        mlflow.end_run()
    monkeypatch.setattr(fluent, "_active_experiment_id", None, raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
