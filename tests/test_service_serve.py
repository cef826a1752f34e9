"""`icu-forecast serve` as a real process on loopback: readiness, forecasts, SIGHUP reload."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from mlflow import MlflowClient
from service_support import history_body, served_model_fixture  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def two_versions(served_model, name: str) -> tuple[MlflowClient, str, str]:
    """Two registered versions of the served model under ``name``; ``champion`` on the first."""
    from service.model import _mlflow_store

    uri = served_model.tracking_uri
    client = MlflowClient(uri, uri)
    with _mlflow_store(uri), contextlib.chdir(served_model.root):
        v1, v2 = (
            str(
                client.copy_model_version(
                    f"models:/icu-forecast-cfc/{served_model.version}", name
                ).version
            )
            for _ in range(2)
        )
    client.set_registered_model_alias(name, "champion", v1)
    return client, v1, v2


@contextlib.contextmanager
def serving(served_model, name, repo_root, log, env_extra: dict, *flags: str):
    """`icu-forecast serve` as a process with its output in ``log``; yields (process, base URL)
    and stops it with SIGTERM (killed if it does not exit within 30 s)."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": served_model.tracking_uri,
        "MODEL_URI": f"models:/{name}@champion",
        "PYTHONUNBUFFERED": "1",
    }
    for k in ("API_KEY", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(k, None)
    env.update(env_extra)
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_serve_command_and_sighup_reload(served_model, tmp_path, repo_root):
    name = "icu-forecast-serve-test"
    client, v1, v2 = two_versions(served_model, name)
    log = tmp_path / "serve.log"
    auth = {"authorization": "Bearer k3y"}
    # Access lines are written in batches: with a long interval, only the shutdown writes them.
    env = {"API_KEY": "k3y", "ICU_FORECAST_LOG_FLUSH_S": "30"}
    with serving(served_model, name, repo_root, log, env) as (proc, base):
        wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, 120, "readiness")
        body = history_body()
        body["history"][0]["values"]["heart_rate"] = 101.2345678
        resp = httpx.post(
            f"{base}/v1/forecast", json=body, headers=auth | {"x-request-id": "abc-1"}
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"]["version"] == v1
        assert httpx.post(f"{base}/v1/forecast", json=body).status_code == 401

        client.set_registered_model_alias(name, "champion", v2)
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: httpx.get(f"{base}/v1/model", headers=auth).json()["version"] == v2,
            60,
            "the SIGHUP reload",
        )
        resp = httpx.post(f"{base}/v1/forecast", json=body, headers=auth)
        assert resp.json()["model"]["version"] == v2
        for i in range(5):  # the last access lines, written at shutdown
            headers = auth | {"x-request-id": f"last-{i}"}
            assert httpx.post(f"{base}/v1/forecast", json=body, headers=headers).is_success
    text = log.read_text()
    # uvicorn shuts down gracefully, then re-raises SIGTERM, so the exit reads as that signal.
    assert proc.returncode in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text
    assert "request_id=abc-1" in text and "status=200" in text and "latency_ms=" in text
    assert "status=401" in text
    assert all(f"request_id=last-{i} " in text for i in range(5)), text
    assert "101.2345678" not in text


def _metric(text: str, name: str, **labels: str) -> list[float]:
    """Values of the samples of ``name`` whose labels include ``labels``."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            out.append(float(value))
    return out


@pytest.mark.slow
def test_serve_workers_share_reloads_and_metrics(served_model, tmp_path, repo_root):
    """`serve --workers 2`: both workers serve (the supervisor hands them the connections),
    /metrics counts all of them, a reload through the endpoint (one worker) or SIGHUP (the
    supervisor) reaches every worker, and the workers write the access log."""
    name = "icu-forecast-workers-test"
    client, v1, v2 = two_versions(served_model, name)
    log = tmp_path / "serve.log"
    env = {"ICU_FORECAST_RELOAD_POLL_S": "0.2", "ICU_FORECAST_LOG_FLUSH_S": "30"}
    with serving(served_model, name, repo_root, log, env, "--workers", "2") as (proc, base):

        def versions(n: int = 16) -> set[str]:
            # httpx.get opens a fresh connection each time, which may land on either worker.
            return {httpx.get(f"{base}/v1/model").json()["version"] for _ in range(n)}

        def model_pids() -> set[str]:
            text = httpx.get(f"{base}/metrics").text
            return {
                line.split('pid="')[1].split('"')[0]
                for line in text.splitlines()
                if line.startswith("icu_forecast_model_info{")
            }

        # A worker joins the supervisor's rotation once started, so /readyz answers only for
        # the workers already in it: wait until both report a model.
        wait_for(lambda: len(model_pids()) == 2, 180, "both workers ready")
        body = history_body()
        for _ in range(20):
            resp = httpx.post(f"{base}/v1/forecast", json=body)
            assert resp.status_code == 200, resp.text
            assert resp.json()["model"]["version"] == v1
        text = httpx.get(f"{base}/metrics").text
        served = _metric(text, "icu_forecast_requests_total", route="/v1/forecast", status="200")
        assert sum(served) == 20, text

        client.set_registered_model_alias(name, "champion", v2)
        resp = httpx.post(f"{base}/v1/model/reload")
        assert resp.status_code == 200 and resp.json()["model"]["version"] == v2, resp.text
        wait_for(lambda: versions() == {v2}, 60, "every worker to follow the endpoint reload")

        client.set_registered_model_alias(name, "champion", v1)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: versions() == {v1}, 60, "every worker to follow SIGHUP")
        text = httpx.get(f"{base}/metrics").text
        assert sum(_metric(text, "icu_forecast_model_reloads_total", result="success")) == 6
        assert _metric(text, "icu_forecast_model_loaded") == [1.0], text
        for _ in range(10):  # the last access lines, written at shutdown
            assert httpx.post(f"{base}/v1/forecast", json=body).status_code == 200
    text = log.read_text()
    assert proc.returncode == 0, text
    assert text.count("Application shutdown complete") == 2, text
    # The workers log like a single process: one access line per request, and their reloads.
    assert text.count("route=/v1/forecast status=200") == 30, text
    assert "reload (broadcast" in text, text
