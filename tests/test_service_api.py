"""Endpoints, auth, logging, metrics, batching and reload (TestClient with the lifespan)."""

from __future__ import annotations

import asyncio
import logging
import re

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_support import (
    bin_start,
    history_body,
    plan,
    served_model_fixture,  # noqa: F401
    spied_loader,
    values_matrix,
)

from features.catalog import INTERVENTION_NAMES, STATE_NAMES
from service.app import create_app
from service.model import LoadedModel, ModelLoadError
from service.settings import ServiceSettings


def make_app(served_model, spy: bool = False, **overrides):
    settings = ServiceSettings(**served_model.settings_kwargs, **overrides)
    loader = spied_loader(settings, served_model.loader) if spy else served_model.loader
    return create_app(settings, loader)


@pytest.fixture(scope="module")
def client(served_model):
    with TestClient(make_app(served_model, spy=True)) as c:
        yield c


def spy_calls(client) -> list[int]:
    return client.app.state.holder.current.forecaster.calls


def test_health_and_ready(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["model"]["name"]


def test_forecast_shape_and_times(client):
    resp = client.post("/v1/forecast", json=history_body(n_bins=3, horizon=4))
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["horizon"] == 4 and len(out["forecast"]) == 4
    assert set(out["model"]) == {"name", "version", "run_id"}
    for k, step in enumerate(out["forecast"], start=1):
        assert step["step"] == k
        # History bins 0..2; forecast bin k is history bin 2 + k.
        assert step["bin_start"] == bin_start(2 + k)
        assert list(step["values"]) == list(STATE_NAMES)
        assert all(np.isfinite(v) for v in step["values"].values())
        assert list(step["interventions"]) == list(INTERVENTION_NAMES)
    assert resp.headers["x-request-id"]


def test_assumed_interventions_are_stated(client):
    out = client.post("/v1/forecast", json=history_body(horizon=2)).json()
    assumed = [w for w in out["warnings"] if w["kind"] == "interventions_assumed"]
    assert len(assumed) == 1 and "iv_fluid_ml 500" in assumed[0]["message"]
    assert [s["interventions"]["iv_fluid_ml"] for s in out["forecast"]] == [500.0, 500.0]
    planned = client.post(
        "/v1/forecast", json=history_body(horizon=2, planned_interventions=plan(2))
    ).json()
    assert not [w for w in planned["warnings"] if w["kind"] == "interventions_assumed"]
    assert planned["forecast"][1]["interventions"] == dict.fromkeys(INTERVENTION_NAMES, 0.0)


def test_planned_interventions_change_the_forecast(client):
    base = history_body(horizon=3, planned_interventions=plan(3))
    what_if = history_body(horizon=3, planned_interventions=plan(3, vasopressor=1.0))
    a = values_matrix(client.post("/v1/forecast", json=base).json()["forecast"])
    b = values_matrix(client.post("/v1/forecast", json=what_if).json()["forecast"])
    # The plan for forecast bin k drives bin k+1 onwards: the first step cannot see it.
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    assert not np.allclose(a[1:], b[1:])


def test_batch_is_one_model_call_and_matches_singles(client):
    bodies = [history_body(n_bins=1 + i % 4, horizon=1 + i % 3, id=f"p{i}") for i in range(12)]
    bodies[3]["planned_interventions"] = plan(bodies[3]["horizon"], mechanical_ventilation=1.0)
    calls = spy_calls(client)
    calls.clear()
    resp = client.post("/v1/forecast/batch", json={"patients": bodies})
    assert resp.status_code == 200, resp.text
    assert calls == [12]  # vectorised: one Forecaster call for all patients
    results = resp.json()["results"]
    assert [r["id"] for r in results] == [b["id"] for b in bodies]
    for body, res in zip(bodies, results, strict=True):
        single = client.post("/v1/forecast", json=body).json()
        prefix = f"patients[{bodies.index(body)}]."
        for w in res["warnings"]:
            if w.get("field"):
                assert w["field"].startswith(prefix)
                w["field"] = w["field"].removeprefix(prefix)
        assert res["warnings"] == single["warnings"]
        np.testing.assert_allclose(
            values_matrix(res["forecast"]), values_matrix(single["forecast"]), rtol=1e-5, atol=1e-6
        )


def test_concurrent_requests_share_model_calls(served_model):
    """Micro-batching: concurrent single forecasts are gathered into fewer model calls."""
    app = make_app(served_model, spy=True)

    async def main() -> tuple[list[int], list[int]]:
        async with app.router.lifespan_context(app):
            calls = app.state.holder.current.forecaster.calls
            assert calls == [1]  # the test forecast before the model serves
            calls.clear()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                resps = await asyncio.gather(
                    *[c.post("/v1/forecast", json=history_body(horizon=2)) for _ in range(40)]
                )
            return [r.status_code for r in resps], list(calls)

    statuses, calls = asyncio.run(main())
    assert statuses == [200] * 40
    assert sum(calls) == 40
    assert len(calls) < 40, calls


def test_events_form_matches_history_form(client):
    t0 = bin_start(0)
    events = [
        {"time": "2024-03-01T09:00:00Z", "variable": "heart_rate", "value": 80},
        {"time": "2024-03-01T11:00:00Z", "variable": "heart_rate", "value": 90},
        {"time": "2024-03-01T07:00:00Z", "variable": "sodium", "value": 140, "unit": "mmol/L"},
        {"time": "2024-03-01T21:00:00Z", "variable": "temperature", "value": 100.4, "unit": "degF"},
        {"time": "2024-03-01T22:00:00Z", "variable": "glucose", "value": 7, "unit": "mmol/L"},
        {
            "time": "2024-03-01T21:00:00Z",
            "end_time": "2024-03-02T00:00:00Z",
            "variable": "vasopressor",
            "value": 1,
        },
        {"time": "2024-03-01T23:00:00Z", "variable": "iv_fluid_ml", "value": 250},
        {"time": "2024-02-28T00:00:00Z", "variable": "sbp", "value": 120},  # long before intime
    ]
    resp = client.post("/v1/forecast", json={"horizon": 2, "icu_intime": t0, "events": events})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert [w for w in out["warnings"] if w["kind"] == "ignored"]
    history = {
        "horizon": 2,
        "history": [
            {"bin_start": t0, "values": {"heart_rate": 85, "sodium": 140}},
            {
                "bin_start": bin_start(1),
                "values": {"temperature": 38.0, "glucose": 126.0},
                "interventions": {"vasopressor": 0.25, "iv_fluid_ml": 250},
            },
        ],
    }
    ref = client.post("/v1/forecast", json=history).json()
    np.testing.assert_allclose(
        values_matrix(out["forecast"]), values_matrix(ref["forecast"]), rtol=1e-6
    )
    assert [s["bin_start"] for s in out["forecast"]] == [bin_start(2), bin_start(3)]


def test_model_variables_and_openapi(client):
    model = client.get("/v1/model").json()
    assert model["name"] == "icu-forecast-cfc" and model["uri"].endswith("@champion")
    assert model["version"] and model["run_id"]
    assert len(model["data_checksum"]) == 64  # sha256 of the training bins
    names = [v["name"] for v in model["variables"]]
    assert names == [*STATE_NAMES, *INTERVENTION_NAMES]
    variables = client.get("/v1/variables").json()
    temp = next(v for v in variables if v["name"] == "temperature")
    assert temp["unit"] == "degC" and "degF" in temp["accepted_units"]
    assert temp["drop_range"] == [14.2, 47] and temp["clamp_range"] == [32, 42]
    schema = client.get("/openapi.json").json()
    assert {"/v1/forecast", "/v1/forecast/batch", "/v1/model", "/metrics"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


def test_metrics(client):
    client.post("/v1/forecast", json=history_body())
    client.post("/v1/forecast", json={"horizon": 0})
    text = client.get("/metrics").text
    assert 'icu_forecast_requests_total{method="POST",route="/v1/forecast",status="200"}' in text
    assert 'icu_forecast_requests_total{method="POST",route="/v1/forecast",status="422"}' in text
    assert 'icu_forecast_request_duration_seconds_bucket{le="0.01",route="/v1/forecast"}' in text
    info = client.get("/v1/model").json()
    assert f'version="{info["version"]}"' in text
    assert "icu_forecast_patient_forecasts_total" in text
    assert "icu_forecast_model_batch_patients_bucket" in text


def test_access_log_has_request_id_and_no_patient_values(client, caplog):
    body = history_body()
    body["history"][0]["values"]["heart_rate"] = 123.456789
    body["history"][0]["values"]["spo2"] = 43.21987  # clamped: a warning is generated
    bad = history_body()
    bad["history"][0]["values"]["glucose"] = 98765.4321
    with caplog.at_level(logging.DEBUG):
        ok = client.post("/v1/forecast", json=body, headers={"x-request-id": "req-42"})
        rejected = client.post("/v1/forecast", json=bad)
    assert ok.headers["x-request-id"] == "req-42"
    assert "43.21987" in ok.text  # the client is told about its own value...
    access = [r.getMessage() for r in caplog.records if r.name.endswith("access")]
    assert any(
        "request_id=req-42" in m and "status=200" in m and "latency_ms=" in m for m in access
    )
    assert any(rejected.headers["x-request-id"] in m and "status=422" in m for m in access)
    # A generated id is 32 hex digits; the record names the gateway as its source, as
    # ``access_log.info`` there would.
    assert re.fullmatch(r"[0-9a-f]{32}", rejected.headers["x-request-id"])
    records = [r for r in caplog.records if r.name.endswith("access")]
    assert all(r.filename == "middleware.py" and r.funcName == "__call__" for r in records)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in ("123.456789", "43.21987", "98765.4321"):  # ...but the logs never are
        assert secret not in logged


def test_not_ready_until_loaded(served_model):
    registry_up = False
    load = served_model.loader or _mlflow_loader(served_model)

    def flaky() -> LoadedModel:
        if not registry_up:
            raise ModelLoadError("registry unreachable")
        return load()

    settings = ServiceSettings(**served_model.settings_kwargs, load_retry_s=3600)
    with TestClient(create_app(settings, flaky)) as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "registry unreachable" in ready.json()["error"]
        assert c.post("/v1/forecast", json=history_body()).status_code == 503
        assert c.get("/v1/model").status_code == 503
        registry_up = True
        assert c.post("/v1/model/reload").json()["reloaded"] is True
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/forecast", json=history_body()).status_code == 200


def _mlflow_loader(served_model):
    from functools import partial

    from service.model import load_from_mlflow

    kw = served_model.settings_kwargs
    return partial(load_from_mlflow, kw["model_uri"], kw["mlflow_tracking_uri"])


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_auth_on(served_model, header):
    app = make_app(served_model, api_key="s3cret-key")
    good = (
        {"authorization": "Bearer s3cret-key"}
        if header == "authorization"
        else {"x-api-key": "s3cret-key"}
    )
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        for path in ("/v1/model", "/v1/variables", "/metrics"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=good).status_code == 200, path
        # The API's description is open (Swagger UI's "Authorize" button needs it); it holds
        # no patient data.
        assert c.get("/openapi.json").status_code == c.get("/docs").status_code == 200
        for bad in (
            {"authorization": "Bearer wrong"},
            {"authorization": "Basic s3cret-key"},
            {"x-api-key": "s3cret-ke"},
            {"x-api-key": ""},
        ):
            resp = c.post("/v1/forecast", json=history_body(), headers=bad)
            assert resp.status_code == 401
            assert resp.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/forecast", json=history_body(), headers=good).status_code == 200
        assert c.post("/v1/model/reload").status_code == 401
        metrics = c.get("/metrics", headers=good).text
        assert 'route="/v1/forecast",status="401"' in metrics


def test_auth_off_by_default(client):
    assert client.get("/v1/model").status_code == 200
    assert client.post("/v1/forecast", json=history_body()).status_code == 200


def test_a_failing_request_does_not_fail_its_batch_mates(served_model):
    """If the model fails on one request of a micro-batch, only that request gets the 500."""
    app = make_app(served_model, spy=True)

    class Poisoned:
        def __init__(self, inner):
            self.inner = inner
            self.calls: list[tuple[int, bool]] = []

        def forecast(self, state, interventions, lengths, planned):
            poisoned = bool(np.any(state == 77.7777))
            self.calls.append((state.shape[0], poisoned))
            if poisoned:
                raise RuntimeError("model failure")
            return self.inner.forecast(state, interventions, lengths, planned)

    poisoned: list[Poisoned] = []

    async def main() -> list[int]:
        async with app.router.lifespan_context(app):
            holder = app.state.holder
            poisoned.append(Poisoned(holder.current.forecaster))
            holder.current = LoadedModel(holder.current.info, poisoned[0])
            bodies = [history_body() for _ in range(12)]
            bodies[5]["history"][0]["values"]["heart_rate"] = 77.7777
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                resps = await asyncio.gather(*[c.post("/v1/forecast", json=b) for b in bodies])
            return [r.status_code for r in resps]

    statuses = asyncio.run(main())
    assert statuses == [200] * 5 + [500] + [200] * 6
    calls = poisoned[0].calls
    assert any(b > 1 and bad for b, bad in calls), calls  # it did share a call, which failed
    assert (1, True) in calls  # and was retried alone


def test_settings_from_env_and_flags(monkeypatch):
    import argparse

    from features.errors import UserError
    from service.command import configure, settings_from_args

    monkeypatch.setenv("MODEL_URI", "models:/icu-forecast-gru@champion")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x.db")
    monkeypatch.setenv("API_KEY", "from-env")
    monkeypatch.setenv("ICU_FORECAST_PORT", "9001")
    monkeypatch.setenv("ICU_FORECAST_MAX_HORIZON", "7")
    parser = argparse.ArgumentParser()
    configure(parser)
    s = settings_from_args(parser.parse_args(["--port", "9100"]))
    assert s.port == 9100  # flag over env
    assert s.model_uri == "models:/icu-forecast-gru@champion"
    assert s.mlflow_tracking_uri == "sqlite:////tmp/x.db"
    assert s.api_key.get_secret_value() == "from-env" and "from-env" not in repr(s)
    assert s.max_horizon == 7 and s.host == "127.0.0.1"
    s = settings_from_args(parser.parse_args(["--model-uri", "runs:/abc/model"]))
    assert s.model_uri == "runs:/abc/model" and s.port == 9001
    with pytest.raises(UserError, match="port"):
        settings_from_args(parser.parse_args(["--port", "70000"]))


@pytest.mark.parametrize("key", ["", "   ", "\t\n"])
def test_an_empty_api_key_is_refused_not_read_as_auth_off(monkeypatch, key, repo_root):
    """``API_KEY=""`` is a configuration error: `serve` exits 2 with one line, and starts
    nothing (a blank key must never mean an open API)."""
    import os
    import subprocess
    import sys

    from features.errors import UserError

    monkeypatch.setenv("API_KEY", key)
    with pytest.raises(UserError, match="API_KEY is set but empty"):
        import argparse

        from service.command import configure, settings_from_args

        parser = argparse.ArgumentParser()
        configure(parser)
        settings_from_args(parser.parse_args([]))
    with pytest.raises(ValueError, match="API_KEY"):
        ServiceSettings(api_key=key)
    if key == "":
        env = {**os.environ, "API_KEY": key}
        out = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "serve", "--port", "0"],
            cwd=repo_root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "API_KEY" in lines[0], out.stderr


class Recorder:
    """Wraps a Forecaster and keeps the arrays of its last call (what the model was fed)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.fed: dict[str, np.ndarray] = {}

    def forecast(self, state, interventions, lengths, planned):
        self.fed = {"state": state, "interventions": interventions, "planned": planned}
        return self.inner.forecast(state, interventions, lengths, planned)


@pytest.mark.parametrize("amount", [1e308, 1.7e308, 25_000.0])
def test_events_interventions_meet_training_limits_and_the_response_tells_what_was_fed(
    served_model, amount
):
    """A huge IV volume in the events form is clamped to training's maximum with a warning,
    the plan the response reports is the one the model used, and the forecast equals the
    history form's with the clamped value."""
    from features.preprocess import INTERVENTION_MAX

    iv_max = float(INTERVENTION_MAX[INTERVENTION_NAMES.index("iv_fluid_ml")])
    vaso_max = float(INTERVENTION_MAX[INTERVENTION_NAMES.index("vasopressor")])
    t0 = bin_start(0)
    events = [
        {"time": "2024-03-01T09:00:00Z", "variable": "heart_rate", "value": 80},
        {"time": "2024-03-01T21:00:00Z", "variable": "temperature", "value": 37.5},
        {"time": "2024-03-01T23:00:00Z", "variable": "iv_fluid_ml", "value": amount},
        {"time": "2024-03-01T23:30:00Z", "variable": "iv_fluid_ml", "value": amount},
    ]
    with TestClient(make_app(served_model)) as c:
        holder = c.app.state.holder
        recorder = Recorder(holder.current.forecaster)
        holder.current = LoadedModel(holder.current.info, recorder)
        resp = c.post("/v1/forecast", json={"horizon": 2, "icu_intime": t0, "events": events})
        assert resp.status_code == 200, resp.text
        out = resp.json()
        fed = recorder.fed
        clamped = [w for w in out["warnings"] if w["kind"] == "clamped"]
        assert [(w["variable"], w["bins"]) for w in clamped] == [("iv_fluid_ml", [1])], clamped
        assert f"clamped to {iv_max:g}" in clamped[0]["message"]
        # Reported = fed: the assumed plan is the last bin's (clamped) interventions.
        reported = np.array(
            [[s["interventions"][n] for n in INTERVENTION_NAMES] for s in out["forecast"]]
        )
        assert np.isfinite(reported).all()
        np.testing.assert_array_equal(reported, fed["planned"][0])
        assert reported[0, INTERVENTION_NAMES.index("iv_fluid_ml")] == iv_max
        assert (
            np.nanmax(fed["interventions"][..., INTERVENTION_NAMES.index("iv_fluid_ml")]) == iv_max
        )
        assert (
            np.nanmax(fed["interventions"][..., INTERVENTION_NAMES.index("vasopressor")], initial=0)
            <= vaso_max
        )

        history = {
            "horizon": 2,
            "history": [
                {"bin_start": t0, "values": {"heart_rate": 80}},
                {
                    "bin_start": bin_start(1),
                    "values": {"temperature": 37.5},
                    "interventions": {"iv_fluid_ml": iv_max},
                },
            ],
        }
        ref = c.post("/v1/forecast", json=history).json()
        np.testing.assert_allclose(
            values_matrix(out["forecast"]), values_matrix(ref["forecast"]), rtol=1e-6
        )
        # The history form keeps refusing a bin above the maximum (the schema's limit).
        history["history"][1]["interventions"]["iv_fluid_ml"] = amount
        assert c.post("/v1/forecast", json=history).status_code == 422


def test_overlapping_coverage_intervals_are_clamped_to_full_coverage(client):
    """Two overlapping vasopressor intervals never feed the model more than full coverage."""
    t0 = bin_start(0)
    events = [
        {"time": "2024-03-01T09:00:00Z", "variable": "heart_rate", "value": 80},
        *(
            {
                "time": "2024-03-01T08:00:00Z",
                "end_time": "2024-03-01T20:00:00Z",
                "variable": "vasopressor",
                "value": 1,
            }
            for _ in range(2)
        ),
    ]
    resp = client.post("/v1/forecast", json={"horizon": 1, "icu_intime": t0, "events": events})
    assert resp.status_code == 200, resp.text
    step = resp.json()["forecast"][0]
    assert 0 <= step["interventions"]["vasopressor"] <= 1.0


def test_openapi_shows_the_api_key_schemes_on_protected_routes(served_model):
    """Auth is a FastAPI security dependency: OpenAPI lists both ways to send the key on every
    protected operation, and none on the health probes."""
    with TestClient(make_app(served_model, api_key="s3cret-key")) as c:
        doc = c.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"apiKey", "http"}
    header = next(s for s in schemes.values() if s["type"] == "apiKey")
    assert header["in"] == "header" and header["name"] == "X-API-Key"
    assert next(s for s in schemes.values() if s["type"] == "http")["scheme"] == "bearer"
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            names = {n for requirement in op.get("security", []) for n in requirement}
            if path in ("/healthz", "/readyz"):
                assert not names, (method, path)
            else:
                assert names == set(schemes), (method, path)
    # The request bodies are FastAPI's own documentation of the request models.
    body = doc["paths"]["/v1/forecast"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"].endswith("/ForecastRequest")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("horizon", True),
        ("horizon", "3"),
        ("horizon", 2.5),
        ("heart_rate", "88"),
        ("heart_rate", True),
    ],
)
def test_request_types_are_strict(client, field, value):
    body = history_body()
    if field == "horizon":
        body["horizon"] = value
    else:
        body["history"][0]["values"][field] = value
    resp = client.post("/v1/forecast", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["field"].endswith(field)
    # An integer where a float is expected is a number, not a type error; 3.0 is an integer
    # in JSON Schema, so the OpenAPI document accepts it too.
    body = history_body(horizon=3.0)
    body["history"][0]["values"]["heart_rate"] = 88
    assert client.post("/v1/forecast", json=body).status_code == 200


def test_model_errors_are_500_without_their_text(served_model, caplog):
    """A model failure is a 500 whose text (which may quote patient values) reaches neither
    the client nor the log; bad JSON stays a 422."""

    class Failing:
        def forecast(self, *args: object) -> np.ndarray:
            raise RuntimeError("heart_rate 123.456 broke it")

    with TestClient(make_app(served_model), raise_server_exceptions=False) as c:
        assert c.post("/v1/forecast/batch", content=b"{not json").status_code == 422
        holder = c.app.state.holder
        holder.current = LoadedModel(holder.current.info, Failing())
        with caplog.at_level(logging.INFO):
            resp = c.post("/v1/forecast", json=history_body())
        assert resp.status_code == 500
        assert resp.json() == {"detail": "internal error"}
        assert "123.456" not in caplog.text and "RuntimeError" in caplog.text
        assert 'route="/v1/forecast",status="500"' in c.get("/metrics").text


def test_a_client_gone_mid_body_is_not_a_server_error(served_model):
    """A client that disconnects while its body is read is counted as 499, not as a 5xx; one
    that trickles its body past body_timeout_s gets a 408."""
    app = make_app(served_model, body_timeout_s=0.3)

    async def call(messages: list[dict], delay: float = 0.0) -> list[dict]:
        sent: list[dict] = []
        queue = list(messages)

        async def receive() -> dict:
            if len(queue) == 1 and delay:
                await asyncio.sleep(delay)
            return queue.pop(0) if queue else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/forecast",
            "raw_path": b"/v1/forecast",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        await app(scope, receive, send)
        return sent

    async def main() -> tuple[list[dict], list[dict], str]:
        async with app.router.lifespan_context(app):
            part = {"type": "http.request", "body": b'{"horizon": 1, ', "more_body": True}
            gone = await call([part, {"type": "http.disconnect"}])
            slow = await call([part, {"type": "http.request", "body": b"}"}], delay=1.0)
            return gone, slow, app.state.metrics.exposition().decode()

    gone, slow, metrics = asyncio.run(main())
    assert [m["status"] for m in slow if m["type"] == "http.response.start"] == [408]
    assert 'route="/v1/forecast",status="499"' in metrics, metrics
    assert 'route="/v1/forecast",status="408"' in metrics
    assert not re.search(r'icu_forecast_requests_total\{[^}]*status="5', metrics), metrics


def test_model_description_reports_family_and_validation_skill(client, served_model):
    """/v1/model says which family serves and how it did against persistence on its
    validation patients (the numbers recorded in the model at training time)."""
    from mlflow import MlflowClient

    info = client.get("/v1/model").json()
    assert info["family"] == "cfc"
    validation = info["validation"]
    assert validation["reference"] == "persistence"
    assert set(validation["by_k"]) == {"1", "2"}  # the served model was trained with ks=(1, 2)
    run = MlflowClient(served_model.tracking_uri).get_run(served_model.run_id).data.metrics
    for k, row in validation["by_k"].items():
        assert row["skill"] == pytest.approx(run[f"val/skill_k{k}"])
        lo, hi = row["skill_ci"]
        assert lo <= row["skill"] <= hi
