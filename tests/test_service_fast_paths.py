"""The service's performance paths give the same answers as the plain ones.

Warnings computed with whole-array masks and cached messages equal a per-value reference; a
large batch on several intra-op threads equals the same patients forecast one by one; the
micro-batcher gathers concurrent requests into one model call, and a failed shared call fails
only the request that broke it.
"""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from service_support import (
    history_body,
    served_model_fixture,  # noqa: F401
    spied_loader,
    values_matrix,
)

from features.catalog import N_STATE, STATE_BY_NAME, STATE_NAMES
from features.preprocess import CLAMP_HIGH, CLAMP_LOW, DROP_HIGH, DROP_LOW
from service import model as service_model
from service.app import create_app
from service.model import MicroBatcher
from service.requests import _fmt_bins, format_loc, value_warnings
from service.settings import ServiceSettings


def reference_warnings(state: np.ndarray, loc: tuple, source: str) -> list[dict]:
    """The warnings spelled out one value at a time (what ``value_warnings`` must equal)."""
    units = [STATE_BY_NAME[n].unit for n in STATE_NAMES]
    clamped, missing_warnings = [], []
    n = state.shape[0]
    for t in range(n):
        for j, name in enumerate(STATE_NAMES):
            v = float(state[t, j])
            lo, hi = float(CLAMP_LOW[j]), float(CLAMP_HIGH[j])
            if v != v or lo <= v <= hi:
                continue
            where = (
                format_loc((*loc, "history", t, "values", name))
                if source == "history"
                else format_loc((*loc, "events"))
            )
            what = f"{name} {v!r} {units[j]}" + (
                f" in {where}" if source == "history" else f" (mean of bin {t})"
            )
            bound = lo if v < lo else hi
            clamped.append(
                {
                    "kind": "clamped",
                    "variable": name,
                    "field": where,
                    "bins": [t],
                    "message": f"{what} is outside the plausible range [{lo:g}, {hi:g}]: "
                    f"clamped to {bound:g}, as in training",
                }
            )
    for j, name in enumerate(STATE_NAMES):
        observed = [t for t in range(n) if state[t, j] == state[t, j]]
        first = observed[0] if observed else n
        gaps = [t for t in range(first + 1, n) if t not in observed]
        before = list(range(first))
        if gaps:
            missing_warnings.append(
                {
                    "kind": "forward_filled",
                    "variable": name,
                    "bins": gaps,
                    "message": f"{name} not measured in {_fmt_bins(gaps)}: carried forward "
                    "from its last measurement, as in training",
                }
            )
        if before:
            missing_warnings.append(
                {
                    "kind": "imputed",
                    "variable": name,
                    "bins": before,
                    "message": f"{name} not measured up to {_fmt_bins(before)}: imputed from "
                    "the other variables of the bin (the training split's iterative imputer)",
                }
            )
    return clamped + missing_warnings


@st.composite
def raw_states(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**32 - 1))
    p_missing = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    rng = np.random.default_rng(seed)
    inside = rng.uniform(CLAMP_LOW, CLAMP_HIGH, size=(n, N_STATE))
    anywhere = rng.uniform(DROP_LOW, DROP_HIGH, size=(n, N_STATE))
    state = np.where(rng.random((n, N_STATE)) < 0.8, inside, anywhere)
    state[rng.random((n, N_STATE)) < p_missing] = np.nan
    return state


@settings(max_examples=300, deadline=None)
@given(state=raw_states(), source=st.sampled_from(["history", "events"]))
def test_value_warnings_equal_the_per_value_reference(state, source):
    loc = ("body", "patients", 3)
    assert value_warnings(state, loc, source) == reference_warnings(state, loc, source)
    # Cached messages must not leak between calls: a second call gives fresh, equal lists.
    first, second = value_warnings(state, loc, source), value_warnings(state, loc, source)
    assert first == second
    for a, b in zip(first, second, strict=True):
        assert a is not b and a["bins"] is not b["bins"]


def _bodies(n: int) -> list[dict]:
    bodies = []
    for i in range(n):
        body = history_body(n_bins=2 + i % 4, horizon=1 + i % 3)
        body["history"][-1]["values"]["heart_rate"] = 70.0 + 3 * i
        bodies.append(body)
    return bodies


def test_parallel_large_batch_equals_single_forecasts(served_model):
    """A batch big enough for the parallel intra-op threads forecasts each patient exactly as
    a single request does (float64: no dependence on batch mates or thread count)."""
    settings_ = ServiceSettings(
        **served_model.settings_kwargs, parallel_batch_min=4, parallel_threads=2
    )
    app = create_app(settings_, spied_loader(settings_, served_model.loader))
    holder = app.state.holder
    bodies = _bodies(9)
    with TestClient(app) as client:
        holder.current.forecaster.calls.clear()  # the test forecast at load
        threads = torch.get_num_threads()
        batch = client.post("/v1/forecast/batch", json={"patients": bodies})
        assert batch.status_code == 200, batch.text
        assert torch.get_num_threads() == threads  # restored after the parallel call
        calls = holder.current.forecaster.calls
        assert calls == [9]
        singles = [client.post("/v1/forecast", json=b).json() for b in bodies]
    for res, single in zip(batch.json()["results"], singles, strict=True):
        np.testing.assert_allclose(
            values_matrix(res["forecast"]),
            values_matrix(single["forecast"]),
            rtol=1e-5,
            atol=1e-5,
        )
        # The same warnings (their `field` differs: patients[i]... in a batch).
        kinds = [(w["kind"], w.get("variable"), w.get("bins")) for w in res["warnings"]]
        assert kinds == [(w["kind"], w.get("variable"), w.get("bins")) for w in single["warnings"]]


def test_serve_mode_raises_the_young_gc_threshold(served_model):
    before = gc.get_threshold()
    settings_ = ServiceSettings(**served_model.settings_kwargs, gc_gen0_threshold=12_345)
    try:
        with TestClient(create_app(settings_, served_model.loader, serve=True)) as client:
            assert client.get("/readyz").status_code == 200
            assert gc.get_threshold()[0] == 12_345
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


@pytest.mark.parametrize("n", [1, 600])
def test_run_batch_restores_threads(served_model, n):
    from service.model import load_from_mlflow, run_batch
    from service.requests import patient_input
    from service.schemas import request_models

    settings_ = ServiceSettings(**served_model.settings_kwargs)
    model = load_from_mlflow(served_model.settings_kwargs["model_uri"], served_model.tracking_uri)
    forecast_request, _ = request_models(settings_)
    req = forecast_request.model_validate(history_body())
    patients = [patient_input(req)] * n
    before = torch.get_num_threads()
    out = run_batch(model, patients, threads=2)
    assert torch.get_num_threads() == before
    single = run_batch(model, patients[:1])
    np.testing.assert_allclose(out[-1].values, single[0].values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("max_batch", "expected"), [(256, [6, 1]), (4, [4, 2, 1])])
def test_micro_batcher_gathers_requests_arriving_turn_after_turn(monkeypatch, max_batch, expected):
    """Requests that reach the queue one loop turn after another share one model call (up to
    the batch limit); a lone request goes alone, without waiting for company."""
    calls: list[int] = []

    def run_batch(model, patients, threads=None):  # noqa: ANN001
        calls.append(len(patients))
        return [np.zeros((1, N_STATE))] * len(patients)

    monkeypatch.setattr(service_model, "run_batch", run_batch)
    holder = SimpleNamespace(current=SimpleNamespace(info="model"))
    batcher = MicroBatcher(holder, ServiceSettings(micro_batch_max=max_batch), lambda n: None)

    async def request(turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        await batcher.submit([object()])

    async def main() -> None:
        batcher.start()
        await asyncio.gather(*(request(t) for t in range(6)))  # one more each turn
        await request(0)
        await batcher.stop()

    asyncio.run(main())
    assert calls == expected


def test_micro_batcher_fails_only_the_request_that_breaks_a_shared_call(monkeypatch):
    """A model call shared by several requests that fails is retried one request at a time:
    only the request that breaks it gets the error, the others their forecasts."""
    calls: list[int] = []

    def run_batch(model, patients, threads=None):  # noqa: ANN001
        calls.append(len(patients))
        if "bad" in patients:
            raise ValueError("cannot forecast this one")
        return [np.zeros((1, N_STATE))] * len(patients)

    monkeypatch.setattr(service_model, "run_batch", run_batch)
    holder = SimpleNamespace(current=SimpleNamespace(info="model"))
    batcher = MicroBatcher(holder, ServiceSettings(), lambda n: None)

    async def main() -> list:
        batcher.start()
        try:
            return await asyncio.gather(
                batcher.submit(["ok"]),
                batcher.submit(["bad"]),
                batcher.submit(["ok", "ok"]),
                return_exceptions=True,
            )
        finally:
            await batcher.stop()

    good, bad, pair = asyncio.run(main())
    assert calls == [4, 1, 1, 2]
    assert good[0] == "model" and len(good[1]) == 1 and len(pair[1]) == 2
    assert isinstance(bad, ValueError)
