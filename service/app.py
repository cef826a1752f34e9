"""The FastAPI app: ``create_app(settings)`` wires settings, model holder, batcher and routers.

The request models are built per app from the configured limits, so the OpenAPI document shows
them; FastAPI parses and validates the bodies. Responses are written with orjson directly (the
response models only document them). Authentication is a FastAPI security dependency on the
protected router, so OpenAPI lists the schemes and Swagger UI's "Authorize" button works.
"""

import asyncio
import contextlib
import dataclasses
import gc
import hmac
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from functools import partial
from itertools import starmap
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import SecretStr

from features.catalog import (
    BIN_HOURS,
    INTERVENTION_NAMES,
    INTERVENTIONS,
    STATE_NAMES,
    STATE_VARIABLES,
    catalog_version,
)
from service.events import bin_events
from service.logs import queue_log_writes
from service.metrics import ServiceMetrics
from service.middleware import GatewayMiddleware
from service.model import (
    LoadedModel,
    Loader,
    MicroBatcher,
    ModelHolder,
    ModelLoadError,
    PatientResult,
    load_from_mlflow,
)
from service.requests import BIN, PatientInput, format_loc, patient_input
from service.schemas import (
    BatchResponse,
    ForecastResponse,
    ModelDescription,
    VariableInfo,
    request_models,
)
from service.settings import RUN_DIR_ENV, SETTINGS_ENV, ServiceSettings

log = logging.getLogger("icu_forecast.service")

# Touched in the run folder whenever a worker loads a model. A worker started after that (a
# replacement in uvicorn's SIGHUP restart) that cannot load one fails its startup, and uvicorn
# keeps the worker it was to replace; a worker of the first start serves 503 and retries.
SERVED_MARKER = "model-served"
_STARTED_AT = time.time()


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def validation_summary(config: dict[str, Any]) -> dict[str, Any] | None:
    """The served model's skill against persistence on its validation patients, per K, with
    the 95% patient-bootstrap interval (recorded in the model at training time)."""
    metrics = config.get("validation") or {}
    by_k = {
        k: {
            "skill": value,
            "skill_ci": [metrics.get(f"{key}_lo"), metrics.get(f"{key}_hi")],
            "rmse_measured": metrics.get(f"val/rmse_measured_k{k}"),
        }
        for key, value in metrics.items()
        if (k := key.removeprefix("val/skill_k")) != key and k.isdigit()
    }
    if not by_k:
        return None
    return {
        "split": "validation patients",
        "reference": "persistence",
        "metric": "1 - RMSE / RMSE of persistence, measured values, K-th rollout step",
        "by_k": dict(sorted(by_k.items(), key=lambda kv: int(kv[0]))),
    }


# The rows of GET /v1/variables (and of /v1/model's "variables").
_VARIABLES: list[dict[str, Any]] = [
    {
        "name": v.name,
        "kind": "state",
        "unit": v.unit,
        "description": v.description,
        "accepted_units": sorted(set(v.accepted_units) | {v.unit}),
        "drop_range": list(v.drop),
        "clamp_range": list(v.clamp),
        "max_value": None,
    }
    for v in STATE_VARIABLES
] + [
    {
        "name": i.name,
        "kind": "intervention",
        "unit": i.unit,
        "description": i.description,
        "accepted_units": [i.unit],
        "drop_range": None,
        "clamp_range": [0.0, i.max_value],
        "max_value": i.max_value,
    }
    for i in INTERVENTIONS
]
_UNIT = {v["name"]: v["unit"] for v in _VARIABLES}
_RANGE_ERRORS = {"greater_than_equal", "less_than_equal", "greater_than", "less_than"}


def _clean_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic's errors without the echoed input (it can be large, and it is patient data)."""
    out = []
    for e in errors:
        loc = list(e.get("loc", ()))
        msg = str(e.get("msg", "invalid"))
        name = loc[-1] if loc else None
        if e.get("type") in _RANGE_ERRORS and name in _UNIT:
            hint = " (likely a unit error)" if name in STATE_NAMES else ""
            msg = f"{name} in {_UNIT[name]}: {msg}{hint}"
        out.append({"loc": loc, "field": format_loc(loc), "msg": msg, "type": e.get("type")})
    return out


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or invalid API key (when API_KEY is set)"},
    413: {"description": "request body too large"},
    415: {"description": "request body is not JSON"},
    422: {"description": "invalid input; `detail` names each bad field"},
    503: {"description": "no model loaded yet"},
}


# One record type per row of the response: orjson writes a dataclass instance as the object of
# its fields (in this order), and instances of one class share their keys, so a row is built and
# freed in a fraction of what ``dict(zip(names, row))`` costs (its own hash table each). A
# 200-patient batch with intervals has 6,000 such rows; they were most of its response time.
StateRow = dataclasses.make_dataclass("StateRow", [(n, float) for n in STATE_NAMES])
InterventionRow = dataclasses.make_dataclass(
    "InterventionRow", [(n, float) for n in INTERVENTION_NAMES]
)


def _rows(record: type, arrays: list[np.ndarray]) -> Iterator[Any]:
    """The rows of ``arrays`` (each (steps, width)), in order, as ``record`` instances: one
    ``tolist`` for the whole request rather than one per patient and bound."""
    return iter(list(starmap(record, np.concatenate(arrays).tolist())))


def _payloads(patients: list[PatientInput], results: list[PatientResult]) -> list[dict[str, Any]]:
    """Each patient's response object. The rows of every patient are made in one go per kind
    (values, interventions, each level's lower and upper bound) and taken back in the order
    the patients and their steps come, so patients asking for different levels mix freely."""
    values = _rows(StateRow, [r.values for r in results])
    plans = _rows(InterventionRow, [p.planned for p in patients])
    keys = dict.fromkeys(key for r in results for key in r.intervals)
    bounds = {
        key: tuple(
            _rows(StateRow, [r.intervals[key][side] for r in results if key in r.intervals])
            for side in (0, 1)
        )
        for key in keys
    }
    out = []
    for p, r in zip(patients, results, strict=True):
        start = p.first_bin_start + BIN * (p.n_bins - 1)  # the last history bin's
        mine = [(key, *bounds[key]) for key in r.intervals]
        forecast = []
        for k in range(p.horizon):
            start += BIN
            step: dict[str, Any] = {
                "step": k + 1,
                "bin_start": start,
                "values": next(values),
                "interventions": next(plans),
            }
            if mine:
                step["intervals"] = {
                    key: {"lower": next(lower), "upper": next(upper)} for key, lower, upper in mine
                }
            forecast.append(step)
        out.append({"id": p.id, "horizon": p.horizon, "forecast": forecast, "warnings": p.warnings})
    return out


_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="the API key (or send it as a Bearer token)"
)
_bearer = HTTPBearer(auto_error=False, description="the API key as a Bearer token")


def api_key_dependency(key: SecretStr | None) -> Any:
    """A FastAPI security dependency that requires ``key`` (X-API-Key or Bearer), or nothing."""
    expected = key.get_secret_value().encode() if key else None

    async def require_api_key(
        header: Annotated[str | None, Security(_api_key_header)],
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> None:
        if expected is None:
            return
        given = header if header is not None else (bearer.credentials if bearer else None)
        # Constant time: the comparison must not tell an attacker how much of a key matched.
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise HTTPException(
                401,
                "missing or invalid API key (Authorization: Bearer or X-API-Key)",
                headers={"www-authenticate": "Bearer"},
            )

    return require_api_key


def _served_marker() -> str | None:
    folder = os.environ.get(RUN_DIR_ENV)
    return os.path.join(folder, SERVED_MARKER) if folder else None


def create_app(
    settings: ServiceSettings | None = None,
    loader: Loader | None = None,
    *,
    serve: bool = False,
) -> FastAPI:
    """Build the app. ``loader`` replaces loading ``settings.model_uri`` from MLflow (tests).

    ``serve`` (set by ``icu-forecast serve``, which owns its process) moves everything alive
    after a model load out of the garbage collector's generations, and writes the log through a
    queue (``service.logs``) that the shutdown drains.
    """
    settings = settings or ServiceSettings()
    metrics = ServiceMetrics()
    loader = loader or partial(load_from_mlflow, settings.model_uri, settings.mlflow_tracking_uri)

    def on_change(m: LoadedModel) -> None:
        metrics.set_model(m.info.name, m.info.version, m.info.run_id)
        if marker := _served_marker():
            open(marker, "a").close()  # noqa: SIM115 - touch

    holder = ModelHolder(loader, on_change)
    batcher = MicroBatcher(holder, settings, metrics.model_batch.observe)
    ForecastRequest, BatchRequest = request_models(settings)  # noqa: N806 - classes built per app
    events = partial(bin_events, settings=settings)

    async def reload(reason: str) -> LoadedModel:
        try:
            loaded = await holder.reload()
        except ModelLoadError:
            metrics.reloads.labels("failure").inc()
            raise
        metrics.reloads.labels("success").inc()
        log.info("reload (%s) done", reason)
        if serve:
            # Torch, MLflow and pandas leave millions of long-lived objects; a full collection
            # walking them all stalls every request for tens to hundreds of ms. Freezing moves
            # what exists now out of the collector's sight; only request garbage is scanned.
            gc.collect()
            gc.freeze()
            # And collect the young generation less often: a batch request allocates hundreds
            # of thousands of objects that live until its response is written.
            _, gen1, gen2 = gc.get_threshold()
            gc.set_threshold(settings.gc_gen0_threshold, gen1, gen2)
        return loaded

    async def _reload_quietly(reason: str) -> None:
        with contextlib.suppress(ModelLoadError):
            await reload(reason)

    async def retry_initial_load() -> None:
        while holder.current is None:
            await asyncio.sleep(settings.load_retry_s)
            await _reload_quietly("retry")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import torch

        # Undone in reverse order at shutdown, or when a startup that must fail fails.
        async with contextlib.AsyncExitStack() as undo:
            if serve:
                # uvicorn re-raises the stopping signal after shutdown and the process ends
                # without logging.shutdown: the lines still queued are written last.
                undo.callback(queue_log_writes())
            undo.callback(torch.set_num_threads, torch.get_num_threads())
            # One intra-op thread: concurrency comes from batching, and more threads only
            # fight over the cores with the event loop.
            torch.set_num_threads(settings.torch_threads)
            batcher.start()
            undo.push_async_callback(batcher.stop)
            try:
                await reload("startup")
            except ModelLoadError:
                marker = _served_marker()
                if marker and os.path.exists(marker) and os.path.getmtime(marker) < _STARTED_AT:
                    # A replacement worker (uvicorn's SIGHUP restart): failing here makes
                    # uvicorn keep the worker that still serves the previous model.
                    raise
                undo.callback(asyncio.create_task(retry_initial_load()).cancel)
            undo.callback(metrics.process_exiting)
            loop = asyncio.get_running_loop()
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
                # Only in a main thread with signals (not under a test client's portal thread).
                loop.add_signal_handler(
                    signal.SIGHUP, lambda: loop.create_task(_reload_quietly("SIGHUP"))
                )
                undo.callback(loop.remove_signal_handler, signal.SIGHUP)
            yield

    app = FastAPI(
        title="icu-forecast",
        version="0.1.0",
        summary="K-step forecasts of 18 ICU state variables under planned interventions.",
        lifespan=lifespan,
    )
    app.state.holder = holder
    app.state.metrics = metrics
    app.add_middleware(
        GatewayMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
    )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return _json({"detail": _clean_errors(list(exc.errors()))}, 422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # The message may quote input values: it goes to the log only by type, not by text.
        log.error("unhandled %s on %s", type(exc).__name__, request.url.path, exc_info=False)
        return _json({"detail": "internal error"}, 500)

    @app.exception_handler(ModelLoadError)
    async def _not_loaded(request: Request, exc: ModelLoadError) -> Response:
        return _json({"detail": "model not loaded yet", "error": holder.last_error}, 503)

    def _model() -> LoadedModel:
        if holder.current is None:
            raise ModelLoadError("no model loaded")
        return holder.current

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "no model yet"}})
    async def readyz() -> Response:
        """Readiness: 200 once a model is loaded, 503 before."""
        return _json({"status": "ready", "model": _model().info.ref()})

    async def _forecast(patients: list[PatientInput]) -> tuple[Any, list[Any]]:
        info, results = await batcher.submit(patients)
        metrics.forecasts.inc(len(patients))
        for kind, n in Counter(w["kind"] for p in patients for w in p.warnings).items():
            metrics.input_warnings.labels(kind).inc(n)
        return info, results

    api = APIRouter(
        dependencies=[Depends(api_key_dependency(settings.api_key))],
        responses={401: _ERROR_RESPONSES[401]},
    )

    forecast_route = partial(api.post, tags=["forecast"], responses=_ERROR_RESPONSES)

    @forecast_route("/v1/forecast", response_model=ForecastResponse)
    async def forecast(req: Annotated[ForecastRequest, Body()]) -> Response:  # type: ignore[valid-type]
        """Forecast one patient `horizon` bins ahead, from `history` bins or raw `events`."""
        _model()
        p = patient_input(req, ("body",), events)
        info, results = await _forecast([p])
        return _json(_payloads([p], results)[0] | {"model": info.ref()})

    @forecast_route("/v1/forecast/batch", response_model=BatchResponse)
    async def forecast_batch(req: Annotated[BatchRequest, Body()]) -> Response:  # type: ignore[valid-type]
        """Forecast many patients in one model call (all validated first; any error is a 422)."""
        _model()
        patients: list[PatientInput] = []
        errors: list[dict[str, Any]] = []
        for i, r in enumerate(req.patients):
            try:
                patients.append(patient_input(r, ("body", "patients", i), events))
            except RequestValidationError as exc:
                errors.extend(exc.errors())
        if errors:
            raise RequestValidationError(errors)
        info, results = await _forecast(patients)
        return _json({"model": info.ref(), "results": _payloads(patients, results)})

    @api.get("/v1/model", response_model=ModelDescription, tags=["model"])
    async def model_description() -> Response:
        """The model being served, its training data checksum, and the variables it uses."""
        m = _model()
        return _json(
            dataclasses.asdict(m.info)
            | {
                "family": getattr(m.forecaster, "model_name", None),
                "validation": validation_summary(getattr(m.forecaster, "config", {}) or {}),
                "catalog_version": catalog_version(),
                "bin_hours": BIN_HOURS,
                "variables": _VARIABLES,
            }
        )

    @api.post(
        "/v1/model/reload",
        tags=["model"],
        responses={502: {"description": "loading failed; the previous model keeps serving"}},
    )
    async def model_reload() -> Response:
        """Load `MODEL_URI` again (e.g. a new `champion`); on failure the old model serves on.

        With several workers, a successful load here asks uvicorn's supervisor to replace the
        workers one by one (its SIGHUP restart); each replacement loads the model before it
        takes over, and one that cannot keeps its predecessor serving.
        """
        previous = holder.current.info.ref() if holder.current else None
        try:
            loaded = await reload("endpoint")
        except ModelLoadError as exc:
            return _json({"reloaded": False, "error": str(exc), "serving": previous}, 502)
        restarting = os.environ.get(RUN_DIR_ENV) is not None
        if restarting:
            os.kill(os.getppid(), signal.SIGHUP)
        return _json(
            {
                "reloaded": True,
                "model": loaded.info.ref(),
                "previous": previous,
                "workers_restarting": restarting,
            }
        )

    @api.get("/v1/variables", response_model=list[VariableInfo], tags=["model"])
    async def variables() -> Response:
        """The 18 state variables and 3 interventions: units, accepted units and ranges."""
        return _json(_VARIABLES)

    @api.get("/metrics", tags=["health"])
    async def prometheus_metrics() -> Response:
        """Prometheus text format: request counts, latency histograms, model version."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api)
    return app


def create_worker_app() -> FastAPI:
    """The app of one worker under ``serve --workers N`` (uvicorn imports this factory).

    The settings are the supervisor's, passed down as JSON, so CLI flags reach every worker;
    the worker logs as ``icu-forecast`` does (uvicorn starts it as a fresh interpreter that
    configures only uvicorn's own loggers).
    """
    payload = os.environ.get(SETTINGS_ENV)
    settings = ServiceSettings.model_validate_json(payload) if payload else ServiceSettings()
    from pipeline.cli import LOG_FORMAT

    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    return create_app(settings, serve=True)
