"""Helpers for the service tests: request bodies and a spy around the model's Forecaster."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from features.catalog import INTERVENTION_NAMES, STATE_NAMES

T0 = "2024-03-01T08:00:00Z"


def bin_start(i: int, t0: str = T0) -> str:
    from datetime import datetime, timedelta

    base = datetime.fromisoformat(t0.replace("Z", "+00:00"))
    return (base + timedelta(hours=12 * i)).isoformat()


def history_body(n_bins: int = 3, horizon: int = 3, **extra: Any) -> dict[str, Any]:
    """A plausible history with some variables missing (so imputation warnings appear)."""
    hist = []
    for i in range(n_bins):
        values = {
            "heart_rate": 88.0 + i,
            "sbp": 118.0 - i,
            "dbp": 64.0,
            "mbp": 82.0,
            "resp_rate": 19.0,
            "temperature": 37.2,
            "spo2": 96.0,
        }
        if i == 0:
            values |= {"creatinine": 1.1, "sodium": 139.0, "hemoglobin": 10.5}
        hist.append(
            {
                "bin_start": bin_start(i),
                "values": values,
                "interventions": {"vasopressor": 0.0, "iv_fluid_ml": 500.0},
            }
        )
    return {"horizon": horizon, "history": hist, **extra}


class ForecasterSpy:
    """Wraps a Forecaster and records the batch size of every call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def forecast(self, state, interventions, lengths, planned):  # noqa: ANN001
        with self._lock:
            self.calls.append(int(state.shape[0]))
        return self.inner.forecast(state, interventions, lengths, planned)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def values_matrix(forecast: list[dict]) -> np.ndarray:
    return np.array([[step["values"][n] for n in STATE_NAMES] for step in forecast])


def plan(horizon: int, **values: float) -> list[dict[str, float]]:
    return [{n: values.get(n, 0.0) for n in INTERVENTION_NAMES} for _ in range(horizon)]


@contextlib.contextmanager
def mlflow_store(uri: str):
    """Point MLflow's process-wide tracking and registry URIs at ``uri``, then put them back
    (training and ``copy_model_version`` read them; the other tests must not see the change)."""
    import mlflow

    old_tracking, old_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_tracking)
        mlflow.set_registry_uri(old_registry)


def spied_loader(settings: Any, loader: Callable[[], Any] | None = None) -> Callable[[], Any]:
    """The app's loader (``loader`` or MLflow's), its Forecaster wrapped in a ForecasterSpy."""
    from functools import partial

    from service.model import LoadedModel, load_from_mlflow

    inner = loader or partial(load_from_mlflow, settings.model_uri, settings.mlflow_tracking_uri)

    def load() -> Any:
        m = inner()
        return LoadedModel(m.info, ForecasterSpy(m.forecaster))

    return load


# ----------------------------------------------------------------------------- model fixture
MODEL_NAME = "icu-forecast-cfc"


@dataclass
class ServedModel:
    """A tiny CfC trained on synthetic data, registered with alias ``champion``."""

    settings_kwargs: dict[str, Any]
    tracking_uri: str
    etl_dir: Path
    run_id: str
    version: str
    root: Path  # MLflow writes artifacts under ./mlruns: work from here when registering
    loader: Callable[[], Any] | None = None  # None: load MODEL_URI from MLflow, as in production


_CACHE: dict[str, ServedModel] = {}


def train_tiny_model(root: Path, units: int = 8) -> ServedModel:
    """Train once per test process (each test module gets the same model). Also the serving
    benchmark's throwaway model (``units`` 128: the paper's size)."""
    if "model" in _CACHE:
        return _CACHE["model"]
    from mlflow import MlflowClient

    from tests.synthetic import write_synthetic_etl_output
    from training.config import TrainConfig
    from training.train import train_model

    etl = write_synthetic_etl_output(root / "etl", n_stays=40, n_bins=8, seed=0)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = TrainConfig(
        model="cfc",
        data=etl,
        epochs=1,
        units=units,
        backbone_units=units,
        tracking_uri=uri,
        checkpoint_dir=root / "checkpoints",
        plots=False,
        ks=(1, 2),
        sigmas=(0.0,),
        accelerator="cpu",
    )
    # Training sets MLflow's process-wide URIs; put them back for the other tests. The store's
    # default artifact root is ./mlruns: run from the temporary folder so it lands there.
    with mlflow_store(uri), contextlib.chdir(root):
        result = train_model(cfg)
    assert result.registered_version is not None
    MlflowClient(uri, uri).set_registered_model_alias(
        MODEL_NAME, "champion", result.registered_version
    )
    served = ServedModel(
        {"mlflow_tracking_uri": uri, "model_uri": f"models:/{MODEL_NAME}@champion"},
        uri,
        etl,
        result.run_id,
        result.registered_version,
        root,
    )
    _CACHE["model"] = served
    return served


@pytest.fixture(scope="session", name="served_model")
def served_model_fixture(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    if "model" in _CACHE:
        return _CACHE["model"]
    return train_tiny_model(tmp_path_factory.mktemp("service-model"))
