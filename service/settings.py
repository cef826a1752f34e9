"""Typed settings of the forecast service (environment variables, then CLI flags).

The three names users set most keep their conventional, unprefixed environment variables
(``MLFLOW_TRACKING_URI``, ``MODEL_URI``, ``API_KEY``); everything else is
``ICU_FORECAST_<FIELD>`` so generic names such as ``PORT`` in the environment are not picked up
by accident. docs/service.md describes each setting.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import AliasChoices, BeforeValidator, Field, SecretStr, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
# Set by ``icu-forecast serve --workers N`` for the worker processes uvicorn starts: the run
# folder (shared state of one serve) and the supervisor's settings as JSON.
RUN_DIR_ENV = "ICU_FORECAST_RUN_DIR"
SETTINGS_ENV = "ICU_FORECAST_WORKER_SETTINGS"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ICU_FORECAST_", populate_by_name=True, extra="ignore", frozen=True
    )

    mlflow_tracking_uri: str = Field(
        "sqlite:///mlflow.db",
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "mlflow_tracking_uri"),
        description="MLflow tracking / registry store the model is loaded from.",
    )
    model_uri: str = Field(
        "models:/icu-forecast@champion",
        validation_alias=AliasChoices("MODEL_URI", "model_uri"),
        description="MLflow model URI; an alias URI is re-resolved on every reload.",
    )
    api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("API_KEY", "api_key"),
        description="When set, every endpoint except /healthz and /readyz requires it.",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    max_history_bins: int = Field(256, ge=1, description="bins in one patient's history")
    max_events: int = Field(20_000, ge=1, description="raw events in one patient's request")
    max_horizon: int = Field(10, ge=1, description="forecast steps (12-hour bins)")
    max_batch_patients: int = Field(2_000, ge=1, description="patients in one batch request")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request body size")

    # Concurrent single forecasts are gathered into one model call of at most this many
    # patients; the batch is whatever queued up while the previous call ran (no added delay).
    micro_batch_max: int = Field(256, ge=1)
    torch_threads: int = Field(1, ge=1, description="intra-op threads; 1 avoids oversubscription")
    # Model calls this large (the batch endpoint) use parallel_threads intra-op threads; smaller
    # ones gain nothing from a second thread.
    parallel_batch_min: int = Field(512, ge=1)
    parallel_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    # `icu-forecast serve` only: allocations between young-generation collections (Python's 700
    # makes a large batch request collect hundreds of times while it builds its objects).
    gc_gen0_threshold: int = Field(50_000, ge=700)
    load_retry_s: float = Field(30.0, gt=0, description="retry a failed startup load")
    workers: int = Field(1, ge=1, le=64, description="`icu-forecast serve` worker processes")
    worker_ready_timeout_s: int = Field(180, ge=5, description="a replacement worker's startup")
    timeout_keep_alive_s: int = Field(5, ge=1, description="close an idle keep-alive connection")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive (408)")
    limit_concurrency: int | None = Field(None, ge=1, description="per worker; 503 beyond it")
    log_level: Annotated[
        Literal["critical", "error", "warning", "info", "debug"],
        BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v),
    ] = "info"

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: SecretStr | None) -> SecretStr | None:
        # ``API_KEY=""`` is a typo or an unset variable in a template, never a wish to turn auth
        # off: that is done by leaving API_KEY out of the environment.
        if v is not None and not v.get_secret_value().strip():
            raise PydanticCustomError(
                "empty_api_key", "API_KEY is set but empty; unset it to run without a key"
            )
        return v
