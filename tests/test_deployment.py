"""The team deployment path, without containers: an ``mlflow server`` process serving the
artifacts (SQLite backend, loopback port), ``icu-forecast dag run`` logging to it over HTTP,
and ``icu-forecast serve`` loading the champion from it and answering a forecast.

This is what docker-compose.yml runs in three containers; no image registry is reachable where
the tests run, so the same three processes run here directly (docs/dag.md)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from service_support import history_body

from tests.processes import running, wait_until_ok

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dag_to_mlflow_server_then_serve_the_champion(tmp_path: Path, mimic_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICU_", "MLFLOW_"))}
    env |= {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("API_KEY", None)
    store = tmp_path / "mlflow-store"
    store.mkdir()
    port = _free_port()
    server = f"http://127.0.0.1:{port}"
    mlflow_cmd = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", str(store / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with running(mlflow_cmd, store, env, tmp_path / "mlflow.log") as mlflow_proc:
        wait_until_ok(mlflow_proc, f"{server}/health", 120, tmp_path / "mlflow.log", "mlflow")
        pipeline = tmp_path / "pipeline"  # the pipeline's own folder: no store, no artifacts
        pipeline.mkdir()
        dag = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "dag",
                "run",
                "--mimic-dir",
                str(mimic_dir),
                "--data-dir",
                str(pipeline / "data"),
                "--tracking-uri",
                server,
                "--models",
                "gru,persistence",
                "--epochs",
                "2",
            ],  # fmt: skip
            cwd=pipeline,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert dag.returncode == 0, dag.stdout[-3000:] + dag.stderr[-3000:]
        assert f"MLflow store {server}" in dag.stderr.splitlines()[0]
        # Everything went to the server: no store or artifacts where the DAG ran (its data
        # and the training checkpoints only).
        assert {p.name for p in pipeline.iterdir()} <= {"data", "outputs"}
        assert any((store / "artifacts").rglob("MLmodel")), "artifacts not on the server"

        serve_port = _free_port()
        serve_cmd = [
            sys.executable, "-m", "pipeline.cli", "serve", "--host", "127.0.0.1",
            "--port", str(serve_port), "--tracking-uri", server,
            "--model-uri", "models:/icu-forecast@champion",
        ]  # fmt: skip
        elsewhere = tmp_path / "serve"
        elsewhere.mkdir()
        with running(serve_cmd, elsewhere, env, tmp_path / "serve.log") as serve_proc:
            base = f"http://127.0.0.1:{serve_port}"
            wait_until_ok(serve_proc, f"{base}/readyz", 180, tmp_path / "serve.log", "serve")
            resp = httpx.post(f"{base}/v1/forecast", json=history_body(horizon=3), timeout=60)
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["model"]["name"] == "icu-forecast"
            assert len(body["forecast"]) == 3
        assert list(elsewhere.iterdir()) == []  # the service downloaded into a temp folder
