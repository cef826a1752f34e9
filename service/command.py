"""``icu-forecast serve``: run the forecast API with uvicorn (and its own ``--workers``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any
from unittest import mock

from features.settings import settings_from_namespace
from service.settings import LOOPBACK_HOSTS, RUN_DIR_ENV, SETTINGS_ENV, ServiceSettings

log = logging.getLogger("icu_forecast.service")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--model-uri", help="MLflow model URI (env MODEL_URI)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (env MLFLOW_TRACKING_URI)")
    parser.add_argument("--log-level", help="uvicorn / service log level")
    parser.add_argument(
        "--workers",
        type=int,
        help="worker processes on the port, under uvicorn's process manager (env "
        "ICU_FORECAST_WORKERS; default 1); one process uses one core",
    )


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    # --tracking-uri is named like every other command's flag; the setting is named after
    # MLflow's environment variable.
    return settings_from_namespace(
        ServiceSettings, args, "service", mlflow_tracking_uri=args.tracking_uri
    )


def uvicorn_options(settings: ServiceSettings) -> dict[str, Any]:
    """uvicorn.run's keyword arguments for ``settings`` (public uvicorn.run parameters only)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        # The service writes its own access log (request id, route, status, latency).
        "access_log": False,
        # uvloop / httptools when installed: the fast event loop and HTTP parser.
        "loop": "auto",
        "http": "auto",
        "timeout_keep_alive": settings.timeout_keep_alive_s,
        "limit_concurrency": settings.limit_concurrency,
        "timeout_worker_healthcheck": settings.worker_ready_timeout_s,
    }


def run(args: argparse.Namespace) -> int:
    import uvicorn

    settings = settings_from_args(args)
    if settings.host not in LOOPBACK_HOSTS:
        log.warning(
            "binding %s: the API serves health data; put it behind TLS and set API_KEY",
            settings.host,
        )
    if settings.api_key is None:
        log.info("API_KEY not set: the API is open to anyone who can reach it")
    from training import tracking

    log.info(
        "serving %s from MLflow store %s",
        settings.model_uri,
        tracking.describe(settings.mlflow_tracking_uri),
    )
    if why := tracking.missing_store(settings.mlflow_tracking_uri):
        log.warning("%s; /readyz stays 503 until a model can be loaded", why)
    if settings.workers == 1:
        from service.app import create_app

        uvicorn.run(create_app(settings, serve=True), **uvicorn_options(settings))
        return 0
    if "parallel_threads" not in settings.model_fields_set:
        # Each worker has its share of the cores for large batches, not all of them.
        cpus = os.cpu_count() or 1
        settings = settings.model_copy(
            update={"parallel_threads": max(1, cpus // settings.workers)}
        )
    with worker_environment(settings):
        uvicorn.run(
            "service.app:create_worker_app",
            factory=True,
            workers=settings.workers,
            **uvicorn_options(settings),
        )
    return 0


@contextlib.contextmanager
def worker_environment(settings: ServiceSettings) -> Iterator[str]:
    """The run folder and environment the workers inherit (uvicorn spawns them); removed after.

    The settings travel as JSON so every worker builds exactly the supervisor's settings (CLI
    flags included); prometheus-client's multiprocess mode keeps its files in the folder.
    """
    payload = settings.model_dump(mode="json")
    if settings.api_key is not None:
        payload["api_key"] = settings.api_key.get_secret_value()
    with tempfile.TemporaryDirectory(
        prefix="icu-forecast-run-", ignore_cleanup_errors=True
    ) as folder:
        prometheus = os.path.join(folder, "prometheus")
        os.mkdir(prometheus)
        env = {RUN_DIR_ENV: folder, SETTINGS_ENV: json.dumps(payload)}
        with mock.patch.dict(os.environ, env | {"PROMETHEUS_MULTIPROC_DIR": prometheus}):
            yield folder
