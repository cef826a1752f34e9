"""Commands started from another folder say where they look, and looking creates nothing:
a missing SQLite store is a one-line error naming the file (or a 503 naming it), never a new,
empty ``mlflow.db``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MIMIC_DIR")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        env=base | {"PYTHONPATH": str(REPO)} | env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_compare_and_promote_without_a_store_name_it_and_create_nothing(tmp_path: Path) -> None:
    for command in (["compare"], ["promote"]):
        res = _cli(command, tmp_path)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and f"no MLflow store at {tmp_path / 'mlflow.db'}" in lines[0]
        assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_dag_status_says_where_it_looks_and_creates_nothing(tmp_path: Path) -> None:
    res = _cli(["dag", "status"], tmp_path, MIMIC_DIR=str(tmp_path / "absent"))
    assert res.returncode == 0, res.stderr
    first = res.stderr.splitlines()[0]
    assert f"data folder {tmp_path / 'data'}" in first
    assert f"MLflow store sqlite:///mlflow.db ({tmp_path / 'mlflow.db'})" in first
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "data").exists()


def test_a_missing_model_store_is_named_in_the_503(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import ServiceSettings

    db = tmp_path / "nowhere" / "mlflow.db"
    settings = ServiceSettings(mlflow_tracking_uri=f"sqlite:///{db}", load_retry_s=60)
    with TestClient(create_app(settings)) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert f"no MLflow store at {db}" in ready.json()["error"]
    assert not db.parent.exists()


def test_a_load_failure_names_the_store(tmp_path: Path, mlflow_uri: str) -> None:
    from service.model import ModelLoadError, load_from_mlflow
    from training import tracking

    tracking.setup(mlflow_uri)  # a store that exists, without the model
    with pytest.raises(ModelLoadError, match=re.escape(f"from MLflow store {mlflow_uri}:")):
        load_from_mlflow("models:/icu-forecast-cfc@champion", mlflow_uri)
