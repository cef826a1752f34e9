"""Forecaster: ETL-identical preprocessing, vectorised batches, planned interventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.catalog import N_STATE
from tests.synthetic import write_synthetic_etl_output
from training.data import BinsDataModule
from training.evaluate import evaluate
from training.forecaster import Forecaster
from training.models import ModelConfig, build_model
from training.pyfunc import ForecastInputError, frame_to_arrays, synthetic_input_example


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    data = write_synthetic_etl_output(tmp_path_factory.mktemp("fc") / "out", n_stays=20, n_bins=9)
    dm = BinsDataModule(data)
    dm.setup("fit")
    torch.manual_seed(0)
    # zero_head off: an untrained network must not be persistence, or plans could not matter
    model = build_model(
        ModelConfig(model="cfc", units=8, layers=2, backbone_units=8, zero_head=False)
    )
    return dm, Forecaster(model, dm.preprocessor, "cfc")


def _windows_as_histories(seqs, windows, k: int):  # noqa: ANN001, ANN202
    b, t = len(windows.stay), max(len(s) for s in seqs.state)
    state = np.full((b, t, N_STATE), np.nan)
    iv = np.full((b, t, 3), np.nan)
    planned = np.full((b, k, 3), np.nan)
    for j, (i, s) in enumerate(zip(windows.stay, windows.start, strict=True)):
        state[j, : s + 1] = seqs.raw_state[i][: s + 1]
        iv[j, : s + 1] = seqs.interventions[i][: s + 1]
        planned[j, : k - 1] = seqs.interventions[i][s + 1 : s + k]
    return state, iv, windows.start + 1, planned


def test_forecast_from_raw_history_equals_offline_rollout(setup) -> None:  # noqa: ANN001
    dm, fc = setup
    for split in ("test", "val"):
        seqs = dm.sequences[split]
        w = evaluate(fc.model, seqs, dm.preprocessor, (3,)).windows[3]
        state, iv, lengths, planned = _windows_as_histories(seqs, w, 3)
        out = fc.forecast(state, iv, lengths, planned)
        np.testing.assert_allclose(dm.preprocessor.scale_state(out), w.pred, atol=1e-5)


def test_forecast_is_vectorised_and_row_independent(setup) -> None:  # noqa: ANN001
    """One step call per bin for all rows together; a row's forecast does not depend on the
    other rows."""
    dm, fc = setup
    seqs = dm.sequences["train"]
    w = evaluate(fc.model, seqs, dm.preprocessor, (2,)).windows[2]
    state, iv, lengths, planned = _windows_as_histories(seqs, w, 2)
    calls = []
    step = fc.model.step

    def counting_step(x, st):  # noqa: ANN001, ANN202
        calls.append(x.shape[0])
        return step(x, st)

    fc.model.step = counting_step
    try:
        together = fc.forecast(state, iv, lengths, planned)
    finally:
        del fc.model.step
    assert calls == [len(lengths)] * (state.shape[1] + 1)  # each history bin, one extra step
    for j in (0, len(lengths) // 2, len(lengths) - 1):
        n = lengths[j]
        alone = fc.forecast(
            state[j : j + 1, :n], iv[j : j + 1, :n], lengths[j : j + 1], planned[j : j + 1]
        )
        np.testing.assert_allclose(alone[0], together[j], rtol=1e-9, atol=1e-9)


def test_planned_interventions_reach_the_documented_steps(setup) -> None:  # noqa: ANN001
    dm, fc = setup
    seqs = dm.sequences["train"]
    n = 4
    state = seqs.raw_state[0][None, :n]
    iv = seqs.interventions[0][None, :n]
    base_plan = np.zeros((1, 3, 3))
    base = fc.forecast(state, iv, np.array([n]), base_plan)
    last = base_plan.copy()
    last[0, 2] = [1.0, 1.0, 5000.0]  # during the last forecast bin: cannot matter
    np.testing.assert_array_equal(fc.forecast(state, iv, np.array([n]), last), base)
    first = base_plan.copy()
    first[0, 0] = [1.0, 1.0, 5000.0]  # during forecast bin 0: affects steps 2 and 3 only
    out = fc.forecast(state, iv, np.array([n]), first)
    np.testing.assert_array_equal(out[0, 0], base[0, 0])
    assert not np.allclose(out[0, 1], base[0, 1])


def test_forecast_rejects_bad_shapes(setup) -> None:  # noqa: ANN001
    _, fc = setup
    with pytest.raises(ValueError, match="lengths"):
        fc.forecast(
            np.zeros((1, 2, N_STATE)), np.zeros((1, 2, 3)), np.array([3]), np.zeros((1, 1, 3))
        )
    with pytest.raises(ValueError, match="planned"):
        fc.forecast(
            np.zeros((1, 2, N_STATE)), np.zeros((1, 2, 3)), np.array([2]), np.zeros((1, 0, 3))
        )


def test_pyfunc_frame_errors_name_the_problem() -> None:
    frame = synthetic_input_example()
    ids, state, iv, lengths, planned = frame_to_arrays(frame)
    assert ids == ["example-1", "example-2"] and lengths.tolist() == [3, 3]
    assert planned.shape == (2, 2, 3)
    with pytest.raises(ForecastInputError, match="missing columns.*lactate"):
        frame_to_arrays(frame.drop(columns=["lactate"]))
    with pytest.raises(ForecastInputError, match="no plan rows"):
        frame_to_arrays(frame[frame["kind"] == "history"])
    bad = frame.copy()
    bad.loc[0, "step"] = 7
    with pytest.raises(ForecastInputError, match="steps must be"):
        frame_to_arrays(bad)
