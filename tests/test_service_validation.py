"""Bad input: every case gets a 4xx naming the problem, never a 500 (TestClient + lifespan)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from service_support import bin_start, history_body, plan, served_model_fixture  # noqa: F401

from service.app import create_app
from service.settings import ServiceSettings

LIMITS = {"max_history_bins": 6, "max_events": 20, "max_horizon": 5, "max_body_bytes": 20_000}


@pytest.fixture(scope="module")
def client(served_model) -> TestClient:
    settings = ServiceSettings(**served_model.settings_kwargs, **LIMITS)
    with TestClient(create_app(settings, served_model.loader)) as c:
        yield c


def fields(resp) -> list[str]:
    assert resp.status_code == 422, resp.text
    return [e["field"] for e in resp.json()["detail"]]


def messages(resp) -> str:
    return " | ".join(e["msg"] for e in resp.json()["detail"])


def post(client: TestClient, body: dict):
    return client.post("/v1/forecast", json=body)


def test_valid_request_is_accepted(client):
    assert post(client, history_body()).status_code == 200


def test_unknown_variable(client):
    body = history_body()
    body["history"][1]["values"]["heart_rte"] = 80
    assert fields(post(client, body)) == ["history[1].values.heart_rte"]


def test_unknown_intervention(client):
    body = history_body()
    body["history"][0]["interventions"]["dialysis"] = 1
    assert fields(post(client, body)) == ["history[0].interventions.dialysis"]
    body = history_body(planned_interventions=[{"dialysis": 1}] * 3)
    assert fields(post(client, body)) == [f"planned_interventions[{k}].dialysis" for k in range(3)]


def test_unknown_event_variable(client):
    body = {
        "horizon": 2,
        "icu_intime": bin_start(0),
        "events": [{"time": bin_start(0), "variable": "pulse", "value": 80}],
    }
    assert fields(post(client, body)) == ["events[0].variable"]


def test_wrong_unit(client):
    body = {
        "horizon": 2,
        "icu_intime": bin_start(0),
        "events": [
            {"time": bin_start(0), "variable": "heart_rate", "value": 80, "unit": "bpm"},
            {"time": bin_start(0), "variable": "temperature", "value": 38, "unit": "K"},
        ],
    }
    resp = post(client, body)
    assert fields(resp) == ["events[1].unit"]
    assert "degF" in messages(resp) and "'K'" in messages(resp)


def test_coverage_event_needs_end_time(client):
    vaso = {"time": bin_start(0), "variable": "vasopressor", "value": 1}
    body = {"horizon": 1, "icu_intime": bin_start(0), "events": [vaso]}
    resp = post(client, body)
    assert fields(resp) == ["events[0].end_time"]
    assert "coverage interval" in messages(resp)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers(client, literal):
    text = json.dumps(history_body()).replace('"heart_rate": 89.0', f'"heart_rate": {literal}')
    assert literal in text or literal == "1e999"
    resp = client.post(
        "/v1/forecast", content=text.encode(), headers={"content-type": "application/json"}
    )
    assert fields(resp) == ["history[1].values.heart_rate"]
    assert "finite" in messages(resp)


def test_non_finite_event_value(client):
    text = json.dumps(
        {
            "horizon": 1,
            "icu_intime": bin_start(0),
            "events": [{"time": bin_start(0), "variable": "sbp", "value": 0.5}],
        }
    ).replace("0.5", "NaN")
    resp = client.post("/v1/forecast", content=text, headers={"content-type": "application/json"})
    assert fields(resp) == ["events[0].value"]


def test_value_outside_drop_range(client):
    body = history_body()
    body["history"][2]["values"]["temperature"] = 98.6  # degF sent as degC
    resp = post(client, body)
    assert fields(resp) == ["history[2].values.temperature"]
    assert "degC" in messages(resp) and "unit" in messages(resp)
    body = history_body()
    body["history"][0]["values"]["spo2"] = -1
    assert fields(post(client, body)) == ["history[0].values.spo2"]


def test_event_outside_drop_range_after_unit_conversion(client):
    ok = {"time": bin_start(0), "variable": "temperature", "value": 100.4, "unit": "degF"}
    bad = {"time": bin_start(0), "variable": "glucose", "value": 200, "unit": "mmol/L"}
    body = {"horizon": 1, "icu_intime": bin_start(0), "events": [ok, bad]}
    resp = post(client, body)
    assert fields(resp) == ["events[1].value"]
    assert "3600 mg/dL" in messages(resp)


def test_intervention_out_of_range(client):
    body = history_body()
    body["history"][0]["interventions"]["vasopressor"] = 1.5
    assert fields(post(client, body)) == ["history[0].interventions.vasopressor"]


@pytest.mark.parametrize(
    ("hours", "word"), [(-12, "out of order"), (0, "out of order"), (6, "overlap"), (36, "gap")]
)
def test_bins_out_of_order_or_overlapping(client, hours, word):
    from datetime import datetime, timedelta

    body = history_body(n_bins=3)
    b1 = datetime.fromisoformat(body["history"][1]["bin_start"])
    body["history"][2]["bin_start"] = (b1 + timedelta(hours=hours)).isoformat()
    resp = post(client, body)
    assert fields(resp) == ["history[2].bin_start"]
    assert word in messages(resp)


def test_empty_history(client):
    assert fields(post(client, {"horizon": 2, "history": []})) == ["history"]
    body = {"horizon": 2, "icu_intime": bin_start(0), "events": []}
    assert fields(post(client, body)) == ["events"]


def test_history_or_events_required(client):
    assert fields(post(client, {"horizon": 2})) == ["history"]
    both = history_body() | {"events": [{"time": bin_start(0), "variable": "sbp", "value": 1}]}
    assert fields(post(client, both)) == ["history"]


def test_events_need_intime(client):
    body = {"horizon": 1, "events": [{"time": bin_start(0), "variable": "sbp", "value": 100}]}
    assert fields(post(client, body)) == ["icu_intime"]


@pytest.mark.parametrize("horizon", [0, -1, 6, 10**9, "three", None])
def test_horizon_out_of_range(client, horizon):
    assert fields(post(client, history_body(horizon=horizon))) == ["horizon"]


def test_planned_interventions_must_match_horizon(client):
    resp = post(client, history_body(horizon=3, planned_interventions=plan(2)))
    assert fields(resp) == ["planned_interventions"]
    assert "horizon=3" in messages(resp)


def test_too_many_bins(client):
    resp = post(client, history_body(n_bins=LIMITS["max_history_bins"] + 1))
    assert fields(resp) == ["history"]


def test_too_many_events(client):
    ev = [{"time": bin_start(0), "variable": "sbp", "value": 100}] * (LIMITS["max_events"] + 1)
    resp = post(client, {"horizon": 1, "icu_intime": bin_start(0), "events": ev})
    assert fields(resp) == ["events"]


def test_events_too_far_after_intime(client):
    far = bin_start(LIMITS["max_history_bins"])
    ev = [{"time": far, "variable": "sbp", "value": 100}]
    resp = post(client, {"horizon": 1, "icu_intime": bin_start(0), "events": ev})
    assert fields(resp) == ["events[0].time"]


def test_too_many_patients_in_batch(served_model):
    settings = ServiceSettings(**served_model.settings_kwargs, max_batch_patients=2)
    with TestClient(create_app(settings, served_model.loader)) as c:
        resp = c.post("/v1/forecast/batch", json={"patients": [history_body()] * 3})
        assert fields(resp) == ["patients"]
        assert c.post("/v1/forecast/batch", json={"patients": [history_body()] * 2}).is_success


def test_batch_errors_name_the_patient(client):
    bad = history_body()
    bad["history"][0]["values"]["sbp"] = 1000
    resp = client.post("/v1/forecast/batch", json={"patients": [history_body(), bad]})
    assert fields(resp) == ["patients[1].history[0].values.sbp"]
    bad = history_body(n_bins=2)
    bad["history"][1]["bin_start"] = bad["history"][0]["bin_start"]
    resp = client.post("/v1/forecast/batch", json={"patients": [bad, history_body()]})
    assert fields(resp) == ["patients[0].history[1].bin_start"]


def test_oversized_body_is_413(client):
    big = history_body() | {"id": "x" * 100}
    big["padding"] = "y" * (LIMITS["max_body_bytes"] + 1)
    resp = post(client, big)
    assert resp.status_code == 413
    assert "bytes" in resp.json()["detail"]


def test_oversized_chunked_body_is_413(client):
    """No Content-Length to check up front: the body is counted as it streams in."""

    def chunks():
        yield b'{"horizon": 1, "id": "'
        for _ in range(30):
            yield b"z" * 1000
        yield b'"}'

    resp = client.post(
        "/v1/forecast", content=chunks(), headers={"content-type": "application/json"}
    )
    assert resp.status_code == 413


@pytest.mark.parametrize(
    ("content", "ctype", "status"),
    [
        (b"horizon=1", "application/x-www-form-urlencoded", 415),
        (b"<xml/>", "text/xml", 415),
        (b'{"horizon": 1, "history": [', "application/json", 422),
        (b"[1, 2, 3]", "application/json", 422),
        (b"\xff\xfe", "application/json", 422),
        (b"", "application/json", 422),
    ],
)
def test_non_json_bodies(client, content, ctype, status):
    resp = client.post("/v1/forecast", content=content, headers={"content-type": ctype})
    assert resp.status_code == status, resp.text
    assert resp.json()["detail"]


def test_clamped_values_are_reported_and_clamped(client):
    body = history_body()
    body["history"][1]["values"]["spo2"] = 40.0  # drop range 0-150, clamp range 50-100
    resp = post(client, body)
    assert resp.status_code == 200, resp.text
    clamped = [w for w in resp.json()["warnings"] if w["kind"] == "clamped"]
    assert [w["field"] for w in clamped] == ["history[1].values.spo2"]
    assert "clamped to 50" in clamped[0]["message"]
    body["history"][1]["values"]["spo2"] = 50.0
    same = post(client, body).json()
    assert resp.json()["forecast"] == same["forecast"]  # clamped exactly as training does


def test_warnings_name_every_imputed_value(client):
    body = history_body(n_bins=3)
    resp = post(client, body)
    warnings = resp.json()["warnings"]
    imputed = {w["variable"]: w["bins"] for w in warnings if w["kind"] == "imputed"}
    ffilled = {w["variable"]: w["bins"] for w in warnings if w["kind"] == "forward_filled"}
    # Measured in bin 0 only: carried forward into bins 1 and 2.
    for name in ("creatinine", "sodium", "hemoglobin"):
        assert ffilled[name] == [1, 2]
        assert name not in imputed
    # Never measured: imputed in every bin.
    for name in ("gcs_total", "glucose", "bun", "wbc", "platelets", "potassium", "lactate"):
        assert imputed[name] == [0, 1, 2]
    # Measured everywhere: no warning.
    assert "heart_rate" not in imputed and "heart_rate" not in ffilled
    assert len(imputed) + len(ffilled) == 18 - 7


def test_no_500_for_odd_but_schema_valid_input(client):
    body = history_body(n_bins=1, horizon=5)
    body["history"][0]["values"] = {}  # nothing measured at all
    body["history"][0]["interventions"] = {}
    assert post(client, body).status_code == 200
    body["history"][0]["bin_start"] = "0001-01-01T00:00:00"
    assert post(client, body).status_code in (200, 422)
    body["history"][0]["bin_start"] = "9999-12-31T23:00:00"
    resp = post(client, body)
    assert resp.status_code in (200, 422), resp.text
