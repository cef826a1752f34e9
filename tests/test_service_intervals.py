"""Prediction intervals in the service: format, levels, validation, and offline equality."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_support import (
    bin_start,
    history_body,
    served_model_fixture,  # noqa: F401
)

from features.catalog import INTERVENTION_NAMES, STATE_NAMES
from service.app import create_app
from service.settings import ServiceSettings


@pytest.fixture(scope="module")
def client(served_model):
    settings = ServiceSettings(**served_model.settings_kwargs)
    with TestClient(create_app(settings, served_model.loader)) as c:
        yield c


def _band(step: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    b = step["intervals"][key]
    return (
        np.array([b["lower"][n] for n in STATE_NAMES]),
        np.array([b["upper"][n] for n in STATE_NAMES]),
    )


def test_default_levels_bracket_the_forecast_and_nest(client):
    resp = client.post("/v1/forecast", json=history_body(n_bins=4, horizon=3))
    assert resp.status_code == 200, resp.text
    for step in resp.json()["forecast"]:
        assert set(step["intervals"]) == {"0.8", "0.95"}
        values = np.array([step["values"][n] for n in STATE_NAMES])
        lo80, hi80 = _band(step, "0.8")
        lo95, hi95 = _band(step, "0.95")
        assert (lo95 <= lo80 + 1e-12).all() and (lo80 <= values + 1e-9).all()
        assert (values <= hi80 + 1e-9).all() and (hi80 <= hi95 + 1e-12).all()
        assert (hi95 > lo95).any()


def test_levels_asked_for_are_returned_and_empty_means_none(client):
    body = history_body(n_bins=3, horizon=2, interval_levels=[0.5, 0.9, 0.5])
    out = client.post("/v1/forecast", json=body).json()
    for step in out["forecast"]:
        assert list(step["intervals"]) == ["0.5", "0.9"]
        lo5, hi5 = _band(step, "0.5")
        lo9, hi9 = _band(step, "0.9")
        assert ((hi9 - lo9) >= (hi5 - lo5) - 1e-12).all()
    out = client.post("/v1/forecast", json=history_body(interval_levels=[])).json()
    assert all("intervals" not in s for s in out["forecast"])


def test_batch_gives_each_patient_its_own_levels(client):
    a = history_body(n_bins=3, horizon=2, id="a")
    b = history_body(n_bins=5, horizon=3, id="b", interval_levels=[0.7])
    batch = client.post("/v1/forecast/batch", json={"patients": [a, b]}).json()["results"]
    assert set(batch[0]["forecast"][0]["intervals"]) == {"0.8", "0.95"}
    assert set(batch[1]["forecast"][0]["intervals"]) == {"0.7"}
    single = client.post("/v1/forecast", json=b).json()
    for s1, s2 in zip(batch[1]["forecast"], single["forecast"], strict=True):
        np.testing.assert_allclose(_band(s1, "0.7"), _band(s2, "0.7"), rtol=1e-9)


def test_batch_answers_each_patient_as_a_single_forecast_would(client):
    """Patients asking for different levels, or none, with different horizons, mixed in one
    batch: each gets the steps, values, plan and bands of its own single forecast."""
    bodies = [
        history_body(n_bins=3, horizon=2, id="a"),
        history_body(n_bins=5, horizon=3, id="b", interval_levels=[0.7]),
        history_body(n_bins=2, horizon=1, id="c", interval_levels=[]),
        history_body(n_bins=4, horizon=4, id="d", interval_levels=[0.95, 0.5]),
        history_body(n_bins=6, horizon=3, id="e"),
    ]
    batch = client.post("/v1/forecast/batch", json={"patients": bodies}).json()["results"]
    assert [r["id"] for r in batch] == ["a", "b", "c", "d", "e"]
    for body, got in zip(bodies, batch, strict=True):
        want = client.post("/v1/forecast", json=body).json()
        assert len(got["forecast"]) == body["horizon"]
        for s1, s2 in zip(got["forecast"], want["forecast"], strict=True):
            assert (s1["step"], s1["bin_start"]) == (s2["step"], s2["bin_start"])
            assert s1["interventions"] == s2["interventions"]
            np.testing.assert_allclose(
                [s1["values"][n] for n in STATE_NAMES],
                [s2["values"][n] for n in STATE_NAMES],
                rtol=1e-9,
            )
            assert list(s1.get("intervals", {})) == list(s2.get("intervals", {}))
            for key in s2.get("intervals", {}):
                np.testing.assert_allclose(_band(s1, key), _band(s2, key), rtol=1e-9)
    assert list(batch[3]["forecast"][0]["intervals"]) == ["0.95", "0.5"]
    assert "intervals" not in batch[2]["forecast"][0]


@pytest.mark.parametrize(
    "levels",
    [[0.0], [1.0], [1.5], [-0.2], [0.5, 0.6, 0.7, 0.8, 0.9, 0.95], ["0.8"], [True], 0.8],
)
def test_bad_levels_are_a_422_naming_the_field(client, levels):
    resp = client.post("/v1/forecast", json=history_body(interval_levels=levels))
    assert resp.status_code == 422, resp.text
    assert any("interval_levels" in d["field"] for d in resp.json()["detail"])
    batch = {"patients": [history_body(), history_body(interval_levels=levels)]}
    resp = client.post("/v1/forecast/batch", json=batch)
    assert resp.status_code == 422
    assert any("patients[1].interval_levels" in d["field"] for d in resp.json()["detail"])


def test_openapi_documents_the_levels_and_the_intervals(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    field = schemas["ForecastRequest"]["properties"]["interval_levels"]
    assert "(0, 1)" in field["description"]
    assert "intervals" in schemas["ForecastStep"]["properties"]
    assert "IntervalBounds" in schemas


def test_served_intervals_equal_offline_evaluation(client, served_model):
    """The band the service returns for a test stay's history is the one offline evaluation
    scores for the same rollout window (same calibration, same rollout), to 1e-6."""
    from training.conformal import stay_windows
    from training.data import BinsDataModule
    from training.evaluate import split_windows

    forecaster = client.app.state.holder.current.forecaster
    cal = forecaster.calibration
    assert cal is not None and cal.horizon == 2  # the fixture trains with ks=(1, 2)
    dm = BinsDataModule(served_model.etl_dir)
    dm.setup("fit")
    test, pre = dm.sequences["test"], dm.preprocessor
    h = 2
    wins, raw = split_windows(forecaster.model, test, pre, (h,))
    w = wins[h]
    offline_pred = pre.unscale_state(w.pred)
    offline = cal.intervals(offline_pred, stay_windows(raw, w.stay, w.start), (0.8, 0.95))
    checked = 0
    for j in range(0, len(w.stay), max(1, len(w.stay) // 6)):
        i, s = int(w.stay[j]), int(w.start[j])
        history = []
        for b in range(s + 1):
            values = {
                n: float(v)
                for n, v in zip(STATE_NAMES, test.raw_state[i][b], strict=True)
                if not math.isnan(v)
            }
            ivs = {
                n: float(v)
                for n, v in zip(INTERVENTION_NAMES, test.interventions[i][b], strict=True)
                if not math.isnan(v)
            }
            history.append({"bin_start": bin_start(b), "values": values, "interventions": ivs})
        nxt = np.nan_to_num(test.interventions[i][s + 1], nan=0.0)
        planned = [dict(zip(INTERVENTION_NAMES, map(float, nxt), strict=True))] * h
        body = {"horizon": h, "history": history, "planned_interventions": planned}
        resp = client.post("/v1/forecast", json=body)
        assert resp.status_code == 200, resp.text
        for k, step in enumerate(resp.json()["forecast"]):
            values = np.array([step["values"][n] for n in STATE_NAMES])
            np.testing.assert_allclose(values, offline_pred[j, k], rtol=1e-6, atol=1e-6)
            for level in (0.8, 0.95):
                lo, hi = _band(step, f"{level:g}")
                np.testing.assert_allclose(lo, offline[level][0][j, k], rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(hi, offline[level][1][j, k], rtol=1e-6, atol=1e-6)
        checked += 1
    assert checked >= 3


def test_a_model_without_calibration_serves_values_only(served_model):
    """Models logged before intervals existed keep serving point forecasts."""
    import dataclasses
    from functools import partial

    from service.model import LoadedModel, load_from_mlflow

    settings = ServiceSettings(**served_model.settings_kwargs)
    inner = served_model.loader or partial(
        load_from_mlflow, settings.model_uri, settings.mlflow_tracking_uri
    )

    def load():
        m = inner()
        return LoadedModel(m.info, dataclasses.replace(m.forecaster, calibration=None))

    with TestClient(create_app(settings, load)) as c:
        out = c.post("/v1/forecast", json=history_body(interval_levels=[0.9])).json()
    assert out["forecast"] and all("intervals" not in s for s in out["forecast"])


def _pyfunc_frame(bodies: list[dict]):  # noqa: ANN202 - a pandas DataFrame
    """The service's request bodies in the pyfunc's long input format (training/pyfunc.py)."""
    import pandas as pd

    rows = []
    for body in bodies:
        for b, hb in enumerate(body["history"]):
            rows.append(
                {"patient_id": body["id"], "kind": "history", "step": b}
                | {n: hb["values"].get(n, np.nan) for n in STATE_NAMES}
                | {n: hb["interventions"].get(n, np.nan) for n in INTERVENTION_NAMES}
            )
        for k, plan in enumerate(body["planned_interventions"]):
            rows.append(
                {"patient_id": body["id"], "kind": "plan", "step": k}
                | dict.fromkeys(STATE_NAMES, np.nan)
                | {n: plan.get(n, np.nan) for n in INTERVENTION_NAMES}
            )
    return pd.DataFrame(rows)


def test_pyfunc_predict_frame_carries_the_served_intervals(client, served_model):
    """The logged pyfunc's output has each level's lower and upper bound next to the point
    forecast, equal to what the service returns for the same patients to 1e-6."""
    import mlflow
    from service_support import mlflow_store

    from training.pyfunc import interval_column

    with mlflow_store(served_model.tracking_uri):
        pyfunc = mlflow.pyfunc.load_model(served_model.settings_kwargs["model_uri"])
    plan = {"vasopressor": 0.1, "mechanical_ventilation": 1.0, "iv_fluid_ml": 250.0}
    bodies = [
        history_body(n_bins=2 + i, horizon=1 + i % 3, id=f"p{i}")
        | {"planned_interventions": [plan] * (1 + i % 3)}
        for i in range(4)
    ]
    frame = _pyfunc_frame(bodies)
    got = pyfunc.predict(frame)
    resp = client.post("/v1/forecast/batch", json={"patients": bodies})
    assert resp.status_code == 200, resp.text
    for body, served in zip(bodies, resp.json()["results"], strict=True):
        mine = got[got["patient_id"] == body["id"]]
        assert mine["step"].tolist() == list(range(1, body["horizon"] + 1))
        for step, (_, row) in zip(served["forecast"], mine.iterrows(), strict=True):
            np.testing.assert_allclose(
                [row[n] for n in STATE_NAMES],
                [step["values"][n] for n in STATE_NAMES],
                rtol=1e-6,
                atol=1e-6,
            )
            assert set(step["intervals"]) == {"0.8", "0.95"}
            for key, band in step["intervals"].items():
                for bound in ("lower", "upper"):
                    cols = [interval_column(n, bound, float(key)) for n in STATE_NAMES]
                    np.testing.assert_allclose(
                        row[cols].to_numpy(float),
                        [band[bound][n] for n in STATE_NAMES],
                        rtol=1e-6,
                        atol=1e-6,
                    )
    # Other levels through the pyfunc's param, and none at all.
    half = pyfunc.predict(frame, params={"interval_levels": [0.5]})
    bands = [c for c in half.columns if c not in ("patient_id", "step", *STATE_NAMES)]
    assert sorted(bands) == sorted(
        interval_column(n, b, 0.5) for n in STATE_NAMES for b in ("lower", "upper")
    )
    lo = half[[interval_column(n, "lower", 0.5) for n in STATE_NAMES]].to_numpy()
    lo80 = got[[interval_column(n, "lower", 0.8) for n in STATE_NAMES]].to_numpy()
    assert (lo >= lo80 - 1e-12).all()
    none = pyfunc.predict(frame, params={"interval_levels": []})
    assert list(none.columns) == ["patient_id", "step", *STATE_NAMES]
    with pytest.raises(Exception, match=r"interval_levels.*\(0, 1\), got 1\.5"):
        pyfunc.predict(frame, params={"interval_levels": [0.8, 1.5]})
