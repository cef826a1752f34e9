"""End to end on tiny synthetic bins: train every model, evaluate, log to MLflow, reload."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import write_synthetic_etl_output
from training.config import TrainConfig
from training.evaluate import KS, SIGMAS, evaluate, sigma_label

MODELS = ("cfc", "cfc-ncp", "gru", "lstm", "ltc", "persistence", "linear", "level", "level-direct")
TINY = {
    "units": 8,
    "layers": 1,
    "backbone_units": 8,
    "ncp_output": 4,
    "ode_unfolds": 2,
    "threads": 1,
}  # one thread: tiny models on a shared 2-core CI machine


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("training_e2e")
    data = write_synthetic_etl_output(root / "data", n_stays=24, n_bins=12, seed=0)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        yield {"root": root, "data": data, "uri": uri, "results": {}}


def _cfg(store: dict, model: str, **kw: object) -> TrainConfig:
    base = {
        "model": model,
        "data": store["data"],
        "epochs": 2,
        "batch_size": 8,
        "accelerator": "cpu",
        "devices": "1",
        "checkpoint_dir": store["root"] / "ckpt",
    }
    return TrainConfig(**(base | TINY | kw))


@pytest.mark.parametrize("model", MODELS)
def test_train_evaluate_log_and_reload(store: dict, model: str) -> None:
    import mlflow
    from mlflow import MlflowClient

    from training.data import BinsDataModule
    from training.train import train_model

    result = train_model(_cfg(store, model, plots=model in ("cfc", "gru")))
    store["results"][model] = result
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == model and run.data.params["seed"] == "0"
    assert run.data.params["data_checksum"] == run.data.tags["data_checksum"]
    assert run.data.tags["code_version"]
    m = run.data.metrics
    for k in KS:
        for name in ("rmse", "mae", "r2"):
            assert np.isfinite(m[f"test/{name}_k{k}"]), f"test/{name}_k{k}"
        for s in SIGMAS:
            assert np.isfinite(m[f"noise/rmse_k{k}_sigma{sigma_label(s)}"])
    assert m["test/rmse_k5"] > 0
    assert np.isfinite(m["test/rmse_measured_k1"])
    for k in KS:  # skill against persistence on the same windows, with its interval
        assert m[f"test/skill_k{k}_lo"] <= m[f"test/skill_k{k}"] <= m[f"test/skill_k{k}_hi"]
        assert np.isfinite(m[f"baseline/direct_rmse_measured_k{k}"])
    assert np.isfinite(m["noise/rel_degradation_k5_sigma0.05"])
    for k in KS:  # conformal intervals: coverage and width, model and persistence
        for lv in ("0.8", "0.95"):
            for name in ("test/coverage", "test/width", "baseline/persistence_width"):
                assert np.isfinite(m[f"{name}_k{k}_l{lv}"]), f"{name}_k{k}_l{lv}"
            assert 0 <= m[f"noise/coverage_k{k}_l{lv}_sigma0.02"] <= 1
            assert 0 <= m[f"test/coverage_k{k}_l{lv}"] <= 1
    assert "val/rmse_k5" in m and "n_params" in m
    if model not in ("persistence",):
        assert m["train_examples_per_s"] > 0
    if model not in ("persistence", "linear", "level", "level-direct"):
        assert m["peak_mem_mb"] > 0 and m["n_params"] > 0
        # the starting model (a checkpoint candidate) and each of the 2 epochs
        assert len(client.get_metric_history(result.run_id, "val_loss")) == 3
    if model == "persistence":
        assert m["n_params"] == 0
    # Artifacts live next to the SQLite store, not in the current directory.
    assert run.info.artifact_uri.startswith((store["root"] / "mlruns").as_uri())
    artifacts = {f.path for f in client.list_artifacts(result.run_id)}
    assert {
        "per_variable_test.json", "per_variable_test.csv", "state_dict", "intervals_test.json"
    } <= artifacts  # fmt: skip
    if model in ("cfc", "gru"):
        plots = {f.path for f in client.list_artifacts(result.run_id, "plots")}
        assert {
            f"plots/{p}.png"
            for p in (
                "rmse_vs_k", "noise", "training_curves", "trajectories", "interval_coverage",
                "interval_fans",
            )
        } <= plots  # fmt: skip
    # The registered pyfunc reproduces the module's offline rollouts from raw histories.
    assert result.registered_version is not None
    uri = f"models:/icu-forecast-{model}/{result.registered_version}"
    pyfunc = mlflow.pyfunc.load_model(uri)
    forecaster = pyfunc.unwrap_python_model().forecaster
    dm = BinsDataModule(store["data"])
    dm.setup("fit")
    test = dm.sequences["test"]
    k = 5
    windows = evaluate(forecaster.model, test, dm.preprocessor, (k,)).windows[k]
    assert len(windows.stay) > 0
    b, t = len(windows.stay), max(len(s) for s in test.state)
    state = np.full((b, t, 18), np.nan)
    iv = np.full((b, t, 3), np.nan)
    planned = np.full((b, k, 3), np.nan)
    lengths = windows.start + 1
    for j, (i, s) in enumerate(zip(windows.stay, windows.start, strict=True)):
        state[j, : s + 1] = test.raw_state[i][: s + 1]  # observed values only
        iv[j, : s + 1] = test.interventions[i][: s + 1]
        planned[j, : k - 1] = test.interventions[i][s + 1 : s + k]
    out = forecaster.forecast(state, iv, lengths, planned)
    scaled = dm.preprocessor.scale_state(out)
    np.testing.assert_allclose(scaled, windows.pred, atol=1e-5)
    np.testing.assert_allclose(
        out, dm.preprocessor.unscale_state(windows.pred), rtol=1e-5, atol=1e-4
    )
    # The registered model carries its conformal calibration (steps 1..max K).
    assert forecaster.calibration is not None and forecaster.calibration.horizon == max(KS)
    lo, hi = forecaster.intervals(out, state, lengths, (0.8,))[0.8]
    assert (lo <= out + 1e-9).all() and (out <= hi + 1e-9).all()
    assert pyfunc.metadata.get_input_schema() is not None
    if model == "gru":
        _check_pyfunc_frame(pyfunc, forecaster, state[:2], iv[:2], lengths[:2], planned[:2])
        _check_scoring_server(pyfunc)


def _check_pyfunc_frame(pyfunc, forecaster, state, iv, lengths, planned) -> None:  # noqa: ANN001
    import pandas as pd

    from features.catalog import INTERVENTION_NAMES, STATE_NAMES

    rows = []
    for i in range(len(lengths)):
        for b in range(lengths[i]):
            rows.append(
                {
                    "patient_id": f"p{i}",
                    "kind": "history",
                    "step": b,
                    **dict(zip(STATE_NAMES, state[i, b], strict=True)),
                    **dict(zip(INTERVENTION_NAMES, iv[i, b], strict=True)),
                }
            )
        for h in range(planned.shape[1]):
            rows.append(
                {
                    "patient_id": f"p{i}",
                    "kind": "plan",
                    "step": h,
                    **{n: np.nan for n in STATE_NAMES},
                    **dict(zip(INTERVENTION_NAMES, planned[i, h], strict=True)),
                }
            )
    frame = pd.DataFrame(rows)
    got = pyfunc.predict(frame)
    assert list(got.columns[: 2 + len(STATE_NAMES)]) == ["patient_id", "step", *STATE_NAMES]
    expect = forecaster.forecast(state, iv, lengths, planned)
    np.testing.assert_allclose(
        got[list(STATE_NAMES)].to_numpy().reshape(expect.shape), expect, rtol=1e-9
    )
    # The conformal bands of the default levels follow the point forecast.
    if forecaster.calibration is not None:
        from training.pyfunc import interval_column

        bands = forecaster.intervals(expect, state, lengths)
        for level, (lo, hi) in bands.items():
            for bound, arr in (("lower", lo), ("upper", hi)):
                cols = [interval_column(n, bound, level) for n in STATE_NAMES]
                np.testing.assert_allclose(got[cols].to_numpy().reshape(arr.shape), arr, rtol=1e-9)


def _check_scoring_server(pyfunc) -> None:  # noqa: ANN001
    """The standard pyfunc scoring path (what ``mlflow models serve`` runs), JSON nulls = NaN."""
    import json

    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from training.pyfunc import synthetic_input_example

    example = synthetic_input_example()
    body = json.dumps({"dataframe_split": json.loads(example.to_json(orient="split", index=False))})
    assert "null" in body
    with TestClient(scoring_server.init(pyfunc)) as client:
        r = client.post("/invocations", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    expect = pyfunc.predict(example)
    assert len(preds) == len(expect) == 4
    assert preds[0]["heart_rate"] == pytest.approx(expect["heart_rate"].iloc[0], rel=1e-9)


def test_compare_and_promote_cli(store: dict) -> None:
    from pipeline.cli import main

    if not store["results"]:
        pytest.fail("needs the runs of test_train_evaluate_log_and_reload")
    out = store["root"] / "compare.md"
    assert main(["compare", "--out", str(out)]) == 0
    text = out.read_text()
    for model in store["results"]:
        assert f"| {model} |" in text
    assert "skill K=5 (%)" in text and "RMSE measured K=5" in text
    assert main(["promote", "--models", "gru", "persistence"]) == 0
    from mlflow import MlflowClient

    client = MlflowClient()
    mv = client.get_model_version_by_alias("icu-forecast-gru", "champion")
    assert str(mv.version) == store["results"]["gru"].registered_version
    served = client.get_model_version_by_alias("icu-forecast", "champion")
    assert served.tags["family"] in ("gru", "persistence")


def test_resume_continues_from_last_checkpoint(store: dict) -> None:
    from training.train import train_model

    cfg = _cfg(store, "gru", epochs=1, register_model=False, plots=False, label="gru-resume")
    first = train_model(cfg)
    resumed = train_model(cfg.model_copy(update={"epochs": 2, "resume": True}))
    assert first.metrics["epochs_run"] == 1
    assert resumed.metrics["epochs_run"] == 2
    # Only the second epoch's batches ran in the resumed process.
    assert resumed.metrics["train_steps"] == first.metrics["train_steps"]


def test_bad_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    from pipeline.cli import main

    rc = main(["train", "--model", "gru", "--data", str(tmp_path / "nope")])
    assert rc == 2


@pytest.mark.slow
def test_ddp_two_cpu_processes(store: dict) -> None:
    """``--strategy ddp --devices 2`` trains one epoch in 2 processes and logs one run."""
    from mlflow import MlflowClient

    # The store the subprocess logs to (not this process's current tracking URI, which an
    # earlier in-process command may have moved); the experiment exists only if another test
    # of this module trained first.
    client = MlflowClient(tracking_uri=store["uri"], registry_uri=store["uri"])
    exp = client.get_experiment_by_name("icu-forecast")
    before = {r.info.run_id for r in client.search_runs([exp.experiment_id])} if exp else set()
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        "--model",
        "gru",
        "--data",
        str(store["data"]),
        "--epochs",
        "1",
        "--units",
        "8",
        "--layers",
        "1",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--label",
        "gru-ddp",
        "--checkpoint-dir",
        str(store["root"] / "ckpt"),
        "--no-plots",
        "--threads",
        "1",
    ]
    repo = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": str(repo), "MLFLOW_TRACKING_URI": store["uri"]}
    env["MLFLOW_REGISTRY_URI"] = store["uri"]
    proc = subprocess.run(
        cmd, cwd=store["root"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = client.get_experiment_by_name("icu-forecast")
    new = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id not in before]
    assert len(new) == 1, "exactly one run (rank 0) is logged"
    run = new[0]
    assert run.data.params["strategy"] == "ddp"
    assert run.data.metrics["world_size"] == 2
    assert np.isfinite(run.data.metrics["test/rmse_k5"])
