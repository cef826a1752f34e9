"""`icu-forecast serve` as a real process on loopback: readiness, forecasts, reloads that keep
the serving model on failure, several workers under uvicorn's process manager, and an access
log that loses no line on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time

import httpx
import pytest
from mlflow import MlflowClient
from service_support import history_body, served_model_fixture  # noqa: F401

from tests.processes import running


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
    from service_support import mlflow_store

    uri = served_model.tracking_uri
    client = MlflowClient(uri, uri)
    with mlflow_store(uri), contextlib.chdir(served_model.root):
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
    with running(cmd, repo_root, env, log) as proc:
        yield proc, f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_serve_command_and_sighup_reload(served_model, tmp_path, repo_root):
    name = "icu-forecast-serve-test"
    client, v1, v2 = two_versions(served_model, name)
    log = tmp_path / "serve.log"
    auth = {"authorization": "Bearer k3y"}
    env = {"API_KEY": "k3y"}
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
        # Many lines right before SIGTERM: the log queue must be drained at shutdown.
        with httpx.Client() as c:
            for i in range(200):
                headers = auth | {"x-request-id": f"last-{i}"}
                assert c.post(f"{base}/v1/forecast", json=body, headers=headers).is_success
    text = log.read_text()
    # uvicorn shuts down gracefully, then re-raises SIGTERM, so the exit reads as that signal.
    assert proc.returncode in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text
    assert "request_id=abc-1" in text and "status=200" in text and "latency_ms=" in text
    assert "status=401" in text
    assert all(f"request_id=last-{i} " in text for i in range(200)), text[-3000:]
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
def test_serve_workers_answer_reload_and_keep_the_model_on_failure(
    served_model, tmp_path, repo_root
):
    """`serve --workers 2` (uvicorn's own process manager): both workers serve, /metrics counts
    all of them, an endpoint reload replaces every worker with one serving the new champion,
    a broken champion changes nothing (endpoint: 502; SIGHUP: the replacement fails its start
    and uvicorn keeps the old worker), and the workers' access lines survive SIGTERM."""
    name = "icu-forecast-workers-test"
    client, v1, v2 = two_versions(served_model, name)
    from service_support import mlflow_store

    with mlflow_store(served_model.tracking_uri):
        broken = client.create_model_version(name, "/nonexistent/icu-forecast/model").version
    log = tmp_path / "serve.log"
    with serving(served_model, name, repo_root, log, {}, "--workers", "2") as (proc, base):

        def versions(n: int = 16) -> set[str]:
            # httpx.get opens a fresh connection each time, which may land on either worker.
            return {httpx.get(f"{base}/v1/model").json()["version"] for _ in range(n)}

        def model_pids() -> dict[str, str]:
            """pid -> version of every live worker's model, from the shared metrics."""
            out = {}
            for line in httpx.get(f"{base}/metrics").text.splitlines():
                if line.startswith("icu_forecast_model_info{") and line.endswith(" 1.0"):
                    pid = line.split('pid="')[1].split('"')[0]
                    out[pid] = line.split('version="')[1].split('"')[0]
            return out

        wait_for(lambda: len(model_pids()) == 2, 180, "both workers ready")
        first = model_pids()
        assert set(first.values()) == {v1}
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
        assert resp.json()["workers_restarting"] is True
        wait_for(
            lambda: (p := model_pids()) and set(p.values()) == {v2} and not set(p) & set(first),
            180,
            "every worker replaced by one serving v2",
        )
        assert versions() == {v2}
        second = model_pids()

        client.set_registered_model_alias(name, "champion", broken)
        resp = httpx.post(f"{base}/v1/model/reload")
        assert resp.status_code == 502 and resp.json()["serving"]["version"] == v2, resp.text
        proc.send_signal(signal.SIGHUP)  # uvicorn: replace each worker; this one cannot load
        wait_for(lambda: "keeping worker" in log.read_text(), 120, "uvicorn to keep the worker")
        assert model_pids() == second and versions() == {v2}
        for _ in range(10):
            assert httpx.post(f"{base}/v1/forecast", json=body).status_code == 200
        text = httpx.get(f"{base}/metrics").text
        assert sum(_metric(text, "icu_forecast_model_reloads_total", result="failure")) >= 1
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    # The workers log like a single process: one access line per request.
    assert text.count("route=/v1/forecast status=200") == 30, text[-3000:]
