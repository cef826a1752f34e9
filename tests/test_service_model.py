"""The served model: parity with the offline rollout, and hot reload from the registry."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from service_support import (
    served_model_fixture,  # noqa: F401
    values_matrix,
)

from features.catalog import INTERVENTION_NAMES, STATE_NAMES
from service.app import create_app
from service.settings import ServiceSettings


def _stay_bodies(served_model, k: int) -> list[tuple[dict, np.ndarray]]:
    """For test stays: the body a client would send (the observed raw values only) and the
    offline K-step rollout of the same model from that stay's last history bin."""
    from service.model import load_from_mlflow
    from training.data import build_sequences, load_bins, stays_from_frame
    from training.rollout import rollout_windows, state_bounds

    frame, _ = load_bins(served_model.etl_dir)
    forecaster = load_from_mlflow(
        served_model.settings_kwargs["model_uri"], served_model.tracking_uri
    ).forecaster
    stays = stays_from_frame(frame)
    seqs = build_sequences(stays, np.flatnonzero(stays.split == "test"), forecaster.preprocessor)
    bounds = state_bounds(forecaster.preprocessor)
    windows = rollout_windows(forecaster.model, seqs.inputs, seqs.state, (k,), bounds=bounds)[k]
    starts = frame.groupby("icustay_id")["bin_start"].min()
    out = []
    for w in range(len(windows.stay)):
        i, s = int(windows.stay[w]), int(windows.start[w])
        raw, iv = seqs.raw_state[i], seqs.interventions[i]
        t0 = starts[seqs.stay_ids[i]].tz_localize("UTC")
        history = [
            {
                "bin_start": (t0 + np.timedelta64(12 * b, "h")).isoformat(),
                "values": {n: float(v) for n, v in zip(STATE_NAMES, raw[b], strict=True) if v == v},
                "interventions": dict(zip(INTERVENTION_NAMES, iv[b].tolist(), strict=True)),
            }
            for b in range(s + 1)
        ]
        # The plan for forecast bin j is what was really given in bin s + 1 + j.
        plan = [
            dict(zip(INTERVENTION_NAMES, iv[s + 1 + j].tolist(), strict=True)) for j in range(k)
        ]
        body = {"horizon": k, "history": history, "planned_interventions": plan}
        out.append((body, forecaster.preprocessor.unscale_state(windows.pred[w])))
    return out


def test_parity_with_offline_rollout(served_model):
    """The service's forecast for a test stay equals the offline K-step rollout to 1e-5."""
    k = 3
    cases = _stay_bodies(served_model, k)
    assert len(cases) >= 5
    settings = ServiceSettings(**served_model.settings_kwargs)
    with TestClient(create_app(settings)) as client:
        for body, offline in cases:
            resp = client.post("/v1/forecast", json=body)
            assert resp.status_code == 200, resp.text
            served = values_matrix(resp.json()["forecast"])
            np.testing.assert_allclose(served, offline, rtol=1e-5, atol=1e-5)
        batch = client.post("/v1/forecast/batch", json={"patients": [b for b, _ in cases]})
        for res, (_, offline) in zip(batch.json()["results"], cases, strict=True):
            np.testing.assert_allclose(
                values_matrix(res["forecast"]), offline, rtol=1e-5, atol=1e-5
            )


@pytest.fixture()
def reload_registry(served_model):
    """A registered model of its own (so other tests' champion is untouched) with two good
    versions of the trained model and one whose artifacts are missing."""
    from service_support import mlflow_store

    uri = served_model.tracking_uri
    client = MlflowClient(uri, uri)
    name = f"icu-forecast-reload-{np.random.default_rng().integers(1 << 30)}"
    src = f"models:/icu-forecast-cfc/{served_model.version}"
    with mlflow_store(uri), contextlib.chdir(served_model.root):
        v1 = client.copy_model_version(src, name)
        v2 = client.copy_model_version(src, name)
        broken = client.create_model_version(name, "/nonexistent/icu-forecast/model")
    client.set_registered_model_alias(name, "champion", v1.version)
    return client, name, str(v1.version), str(v2.version), str(broken.version)


def test_reload_picks_up_new_champion_and_survives_a_broken_one(served_model, reload_registry):
    client, name, v1, v2, broken = reload_registry
    settings = ServiceSettings(
        mlflow_tracking_uri=served_model.tracking_uri, model_uri=f"models:/{name}@champion"
    )
    from service_support import history_body

    with TestClient(create_app(settings)) as c:
        assert c.get("/v1/model").json()["version"] == v1
        before = c.post("/v1/forecast", json=history_body()).json()
        assert before["model"]["version"] == v1

        client.set_registered_model_alias(name, "champion", v2)
        resp = c.post("/v1/model/reload")
        assert resp.status_code == 200 and resp.json()["model"]["version"] == v2
        assert resp.json()["previous"]["version"] == v1
        after = c.post("/v1/forecast", json=history_body()).json()
        assert after["model"]["version"] == v2
        assert after["forecast"] == before["forecast"]  # same weights, new version

        client.set_registered_model_alias(name, "champion", broken)
        resp = c.post("/v1/model/reload")
        assert resp.status_code == 502
        assert resp.json()["reloaded"] is False and resp.json()["serving"]["version"] == v2
        assert "could not load" in resp.json()["error"]
        # The previous model keeps serving, and the failure is visible.
        assert c.get("/readyz").status_code == 200
        still = c.post("/v1/forecast", json=history_body())
        assert still.status_code == 200 and still.json()["model"]["version"] == v2
        metrics = c.get("/metrics").text
        assert 'icu_forecast_model_reloads_total{result="failure"} 1.0' in metrics
        assert 'icu_forecast_model_reloads_total{result="success"} 2.0' in metrics
        assert f'version="{v2}"' in metrics


def test_a_model_that_cannot_forecast_never_replaces_the_serving_one(served_model):
    """Whatever the loader returns runs one test forecast first: a model that raises, gives
    non-finite values or the wrong shape is refused (502), and the previous one serves on."""
    from service_support import history_body

    from service.model import LoadedModel, ModelInfo, load_from_mlflow

    class Raises:
        def forecast(self, *args):  # noqa: ANN002, ANN202
            raise RuntimeError("boom")

    class Shaped:
        def __init__(self, fill: float, steps: int = 2) -> None:
            self.fill, self.steps = fill, steps

        def forecast(self, state, interventions, lengths, planned):  # noqa: ANN001, ANN202
            return np.full((state.shape[0], self.steps, len(STATE_NAMES)), self.fill)

    good = load_from_mlflow(served_model.settings_kwargs["model_uri"], served_model.tracking_uri)
    queue = [good]

    def loader() -> LoadedModel:
        return queue.pop(0)

    settings = ServiceSettings(**served_model.settings_kwargs)
    with TestClient(create_app(settings, loader)) as c:
        before = c.post("/v1/forecast", json=history_body())
        assert before.status_code == 200
        bad = [
            (Raises(), "a test forecast failed: RuntimeError: boom"),
            (Shaped(np.nan), "not all finite"),
            (Shaped(0.0, steps=3), "gave (1, 3, 18) values"),
            (object(), "has no forecaster.forecast"),
        ]
        for i, (forecaster, why) in enumerate(bad):
            queue.append(LoadedModel(ModelInfo("broken", str(i), None, "m"), forecaster))
            resp = c.post("/v1/model/reload")
            assert resp.status_code == 502 and why in resp.json()["error"], resp.text
            after = c.post("/v1/forecast", json=history_body())
            assert after.status_code == 200
            assert after.json() == before.json()  # the same model, the same answer
        metrics = c.get("/metrics").text
        assert f'icu_forecast_model_reloads_total{{result="failure"}} {float(len(bad))}' in metrics
