"""End to end on the demo: the DAG (few epochs), then the API serving the registered champion.

`icu-forecast dag run --cv` runs fetch (not needed: the demo copy is there) -> etl -> four
train steps -> compare -> promote, and the cross-validation step, into a fresh SQLite store;
a second run skips every step. Then
`icu-forecast serve` starts on loopback against ``models:/icu-forecast-cfc@champion``, gets the
first bins of a test-split stay as a history (measured values only, as a client would send
them), and its forecast must equal the offline K-step rollout of the same model on the ETL's
rows of that stay, with the stay's true interventions as the plan.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from features.catalog import INTERVENTION_NAMES, OBSERVED_NAMES, STATE_NAMES
from pipeline.cli import main
from tests.processes import wait_until_ok

pytestmark = pytest.mark.slow

HORIZON = 3
STEPS = [
    "fetch",
    "etl",
    "train_cfc",
    "train_gru",
    "train_persistence",
    "train_linear",
    "train_level",
    "train_level-direct",
    "compare",
    "promote",
    "cv",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(stay: pd.DataFrame, n_hist: int) -> list[dict]:
    hist = []
    for _, row in stay.iloc[:n_hist].iterrows():
        values = {
            name: float(row[name])
            for name, obs in zip(STATE_NAMES, OBSERVED_NAMES, strict=True)
            if row[obs] > 0
        }
        hist.append(
            {
                "bin_start": pd.Timestamp(row["bin_start"]).isoformat(),
                "values": values,
                "interventions": {n: float(row[n]) for n in INTERVENTION_NAMES},
            }
        )
    return hist


def _offline_rollout(model_uri: str, bins: pd.DataFrame, stay_id: int, n_hist: int) -> np.ndarray:
    import mlflow

    from training.data import build_sequences, stays_from_frame
    from training.rollout import rollout_windows, state_bounds

    forecaster = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().forecaster
    stays = stays_from_frame(bins)
    test = build_sequences(stays, np.flatnonzero(stays.split == "test"), forecaster.preprocessor)
    i = int(np.flatnonzero(test.stay_ids == stay_id)[0])
    windows = rollout_windows(
        forecaster.model,
        [test.inputs[i]],
        [test.state[i]],
        (HORIZON,),
        bounds=state_bounds(forecaster.preprocessor),
    )
    w = windows[HORIZON]
    j = int(np.flatnonzero(w.start == n_hist - 1)[0])
    return forecaster.preprocessor.unscale_state(w.pred[j])


def test_dag_then_service_matches_offline_rollout(
    tmp_path: Path, mimic_dir: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    args = ["--mimic-dir", str(mimic_dir), "--data-dir", str(data), "--epochs", "1"]
    args += ["--cv", "--cv-folds", "2", "--cv-seeds", "1"]
    assert main(["dag", "run", *args]) == 0
    out = capsys.readouterr().out
    assert "| cfc |" in out and "| gru |" in out  # the comparison table is printed
    assert main(["dag", "run", *args]) == 0
    out = capsys.readouterr().out
    skipped = [ln.split()[1] for ln in out.splitlines() if ln.startswith("[dag]") and "SKIP" in ln]
    assert skipped == STEPS, out
    assert main(["dag", "status", *args]) == 0
    status = dict(ln.split()[:2] for ln in capsys.readouterr().out.splitlines())
    assert status == dict.fromkeys(STEPS, "done")

    promoted = json.loads((data / "dag/champion.json").read_text())
    champion = promoted["champions"]["cfc"]
    assert promoted["overall"]["family"] in promoted["champions"]  # any family, baselines too
    assert promoted["overall"]["model_name"] == "icu-forecast"
    report = json.loads((data / "dag/cv/report.json").read_text())
    assert {r["model"] for r in report["rows"]} == {
        "cfc", "gru", "persistence", "linear", "level", "direct", "level-direct"
    }  # fmt: skip
    assert report["folds"] == 2 and report["seeds"] == [0]
    assert (data / "dag/comparison.md").read_text().count("\n|") >= 5  # header + 4 models

    bins = pd.read_parquet(data / "etl/bins.parquet")
    test_bins = bins[bins["split"] == "test"]
    lengths = test_bins.groupby("icustay_id").size()
    stay_id = int(lengths[lengths >= HORIZON + 3].index[0])
    stay = test_bins[test_bins["icustay_id"] == stay_id].sort_values("bin")
    n_hist = len(stay) - HORIZON
    planned = [
        {n: float(stay.iloc[n_hist + h][n]) for n in INTERVENTION_NAMES} for h in range(HORIZON)
    ]
    body = {"horizon": HORIZON, "history": _history(stay, n_hist), "planned_interventions": planned}

    model_uri = "models:/icu-forecast-cfc@champion"
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    serve = Path(sys.executable).with_name("icu-forecast")
    proc = subprocess.Popen(
        [
            str(serve),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--tracking-uri",
            mlflow_uri,
            "--model-uri",
            model_uri,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "API_KEY"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        log.flush()
        wait_until_ok(proc, f"{base}/readyz", 120, tmp_path / "serve.log", "the service")
        resp = httpx.post(f"{base}/v1/forecast", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        payload = resp.json()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    assert payload["model"]["version"] == champion["version"]
    assert payload["model"]["run_id"] == champion["run_id"]
    served = np.array([[step["values"][n] for n in STATE_NAMES] for step in payload["forecast"]])
    offline = _offline_rollout(model_uri, bins, stay_id, n_hist)
    assert served.shape == offline.shape == (HORIZON, len(STATE_NAMES))
    np.testing.assert_allclose(served, offline, rtol=1e-4, atol=1e-4)
    # and the forecast is a forecast: not simply the last history bin repeated
    last = stay.iloc[n_hist - 1][list(STATE_NAMES)].to_numpy(float)
    assert not np.allclose(served, np.tile(last, (HORIZON, 1)))
