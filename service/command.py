"""``icu-forecast serve``: run the forecast API with uvicorn."""

from __future__ import annotations

import argparse
import logging

from features.settings import settings_from_flags
from service.settings import LOOPBACK_HOSTS, ServiceSettings

log = logging.getLogger("icu_forecast.service")

# uvicorn's HTTP protocol on a transport that sends each response in one write (an import
# string: uvicorn loads it, in each worker too, and the CLI does not import uvicorn early).
HTTP_PROTOCOL = "service.transport:CoalescingHTTPProtocol"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8000)")
    parser.add_argument("--model-uri", default=None, help="MLflow model URI (env MODEL_URI)")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (env MLFLOW_TRACKING_URI)"
    )
    parser.add_argument("--log-level", default=None, help="uvicorn / service log level")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes on the port (env ICU_FORECAST_WORKERS; default 1); one "
        "process uses one core",
    )


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    given = {
        "host": args.host,
        "port": args.port,
        "model_uri": args.model_uri,
        "mlflow_tracking_uri": args.tracking_uri,
        "log_level": args.log_level,
        "workers": args.workers,
    }
    return settings_from_flags(ServiceSettings, given, "service")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.logs import batch_log_writes

    settings = settings_from_args(args)
    if settings.host not in LOOPBACK_HOSTS:
        log.warning(
            "binding %s: the API serves health data; put it behind TLS and set API_KEY",
            settings.host,
        )
    if settings.api_key is None:
        log.info("API_KEY not set: the API is open to anyone who can reach it")
    if settings.workers > 1:
        return _run_workers(settings)
    restore = batch_log_writes(settings.log_flush_s)  # one write per fraction of a second
    try:
        uvicorn.run(create_app(settings, freeze_gc=True), **_uvicorn_options(settings))
    finally:
        restore()
    return 0


def _uvicorn_options(settings: ServiceSettings) -> dict:
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        # The service writes its own access log (request id, route, status, latency).
        "access_log": False,
        # uvloop / httptools when installed: the fast event loop and HTTP parser.
        "loop": "auto",
        "http": HTTP_PROTOCOL,
    }


def _run_workers(settings: ServiceSettings) -> int:
    import os

    import uvicorn

    from service.workers import serve_workers, worker_environment

    if "parallel_threads" not in settings.model_fields_set:
        # Each worker has its share of the cores for large batches, not all of them.
        cpus = os.cpu_count() or 1
        settings = settings.model_copy(
            update={"parallel_threads": max(1, cpus // settings.workers)}
        )
    payload = settings.model_dump(mode="json")
    if settings.api_key is not None:
        payload["api_key"] = settings.api_key.get_secret_value()
    with worker_environment(payload) as folder:
        config = uvicorn.Config(
            "service.app:create_worker_app",
            factory=True,
            workers=settings.workers,
            **_uvicorn_options(settings),
        )
        serve_workers(config, folder)
    return 0
