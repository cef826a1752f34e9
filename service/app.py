"""The FastAPI app: ``create_app(settings)`` wires settings, model holder, batcher and routes.

The request models are built per app from the configured limits (so the OpenAPI document shows
them) and parse the raw body in one pydantic pass; responses are written with orjson directly,
the response models only document them.
"""

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from features.catalog import (
    BIN_HOURS,
    INTERVENTION_NAMES,
    INTERVENTIONS,
    STATE_NAMES,
    STATE_VARIABLES,
    catalog_version,
)
from service.events import bin_events
from service.logs import flush_all as flush_logs
from service.metrics import ServiceMetrics
from service.middleware import GatewayMiddleware
from service.model import (
    LoadedModel,
    Loader,
    MicroBatcher,
    ModelHolder,
    ModelLoadError,
    load_from_mlflow,
)
from service.requests import BIN, InputError, PatientInput, format_loc, patient_input
from service.schemas import (
    BatchResponse,
    ForecastResponse,
    ModelDescription,
    VariableInfo,
    request_models,
)
from service.settings import ServiceSettings
from service.workers import (
    bump_generation,
    configure_worker_logging,
    mark_worker_gone,
    read_generation,
    run_dir,
    watch_generation,
    worker_settings_payload,
)

log = logging.getLogger("icu_forecast.service")


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def variables_info() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
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
    ]
    out += [
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
    return out


_VARIABLES = variables_info()
_RANGE_ERRORS = {"greater_than_equal", "less_than_equal", "greater_than", "less_than"}
_UNIT = {v.name: v.unit for v in STATE_VARIABLES} | {i.name: i.unit for i in INTERVENTIONS}


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
    413: {"description": "request body too large"},
    415: {"description": "request body is not JSON"},
    422: {"description": "invalid input; `detail` names each bad field"},
    503: {"description": "no model loaded yet"},
}


def _body_schema(name: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
    }


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        for e in errors:
            e["loc"] = ("body", *e["loc"])
        raise InputError(errors) from None


def _patient_payload(p: PatientInput, values: Any) -> dict[str, Any]:
    start = p.first_bin_start + BIN * (p.n_bins - 1)  # the last history bin's
    forecast = []
    # ``values`` and ``planned`` have one row per forecast step (``horizon``), 18 and 3 wide.
    for k, (row, plan) in enumerate(zip(values.tolist(), p.planned.tolist(), strict=True), 1):
        start += BIN
        forecast.append(
            {
                "step": k,
                "bin_start": start,
                "values": dict(zip(STATE_NAMES, row, strict=True)),
                "interventions": dict(zip(INTERVENTION_NAMES, plan, strict=True)),
            }
        )
    return {"id": p.id, "horizon": p.horizon, "forecast": forecast, "warnings": p.warnings}


class DirectEndpoint:
    """A POST endpoint as a bare ASGI app: read the body, call ``handler``, send its response.

    The forecast endpoints take most of the traffic, and FastAPI's route machinery (exception
    middlewares, dependency solving, request objects) cost about as much per request as
    parsing the body does. Errors become the same responses the app's exception handlers give.
    """

    def __init__(self, handler: Callable[[bytes], Awaitable[Response]], log: logging.Logger):
        self.handler = handler
        self.log = log

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            chunks = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client is gone: nobody to answer
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            response = await self.handler(b"".join(chunks))
        except InputError as exc:
            response = _json({"detail": _clean_errors(exc.errors)}, 422)
        except HTTPException as exc:  # e.g. 413 from the gateway's body counter
            response = _json({"detail": exc.detail}, exc.status_code)
        except Exception as exc:
            # The message may quote input values: it goes to the log only by type, not by text.
            self.log.error("unhandled %s on %s", type(exc).__name__, scope["path"])
            response = _json({"detail": "internal error"}, 500)
        await response(scope, receive, send)


class ServiceApp(FastAPI):
    """FastAPI with the gateway in front of all of it, the framework's own middleware included.

    Every HTTP request passes the gateway first (request id, auth, body limits, access log,
    metrics). The forecast endpoints, most of the traffic, are then answered by the gateway's
    ``DirectEndpoint``s, so they also skip the framework's per-request layers (error,
    telemetry and body-size middlewares: a few percent of a worker's time under load); every
    other request continues into the whole FastAPI stack, as it did with the gateway as a
    middleware. Lifespan events go to FastAPI directly.
    """

    gateway: GatewayMiddleware

    def put_gateway_in_front(self, make: Callable[[Any], GatewayMiddleware]) -> None:
        """``make(app)`` builds the gateway around ``app``, the FastAPI stack behind it."""
        self.gateway = make(super().__call__)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["app"] = self  # as FastAPI sets it, for the gateway and its direct endpoints
            await self.gateway(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(
    settings: ServiceSettings | None = None,
    loader: Loader | None = None,
    *,
    freeze_gc: bool = False,
) -> ServiceApp:
    """Build the app. ``loader`` replaces loading ``settings.model_uri`` from MLflow (tests).

    ``freeze_gc`` (set by ``icu-forecast serve``, which owns its process) moves everything
    alive after a model load out of the garbage collector's generations.
    """
    settings = settings or ServiceSettings()
    metrics = ServiceMetrics()
    loader = loader or partial(load_from_mlflow, settings.model_uri, settings.mlflow_tracking_uri)

    def on_change(m: LoadedModel) -> None:
        metrics.set_model(m.info.name, m.info.version, m.info.run_id)

    holder = ModelHolder(loader, on_change)
    batcher = MicroBatcher(
        holder,
        settings.micro_batch_max,
        metrics.model_batch.observe,
        settings.model_in_thread,
        parallel_min=settings.parallel_batch_min,
        parallel_threads=settings.parallel_threads,
    )
    models = request_models(settings)
    ForecastRequest = models.forecast  # noqa: N806 - a class built per app
    BatchRequest = models.batch  # noqa: N806

    async def reload(reason: str) -> LoadedModel:
        try:
            loaded = await holder.reload()
        except ModelLoadError:
            metrics.reloads.labels("failure").inc()
            raise
        metrics.reloads.labels("success").inc()
        log.info("reload (%s) done", reason)
        if freeze_gc:
            # Torch, MLflow and pandas leave millions of long-lived objects; a full collection
            # walking them all stalls every request for tens to hundreds of ms. Freezing moves
            # what exists now out of the collector's sight; only request garbage is scanned.
            gc.collect()
            gc.freeze()
            # And collect the young generation less often: a batch request allocates hundreds
            # of thousands of objects that live until its response is written, and the
            # default threshold (700) scans and promotes them again and again on the way.
            _, gen1, gen2 = gc.get_threshold()
            gc.set_threshold(settings.gc_gen0_threshold, gen1, gen2)
        return loaded

    # Several workers (serve --workers N): reloads are broadcast through the run folder.
    shared = run_dir()
    seen_generation = read_generation(shared) if shared else 0

    def broadcast_reload() -> None:
        nonlocal seen_generation
        if shared is not None:
            seen_generation = bump_generation(shared)

    async def reload_generation(g: int) -> None:
        nonlocal seen_generation
        seen_generation = g
        await _reload_quietly(f"broadcast {g}")

    async def retry_initial_load() -> None:
        while holder.current is None:
            await asyncio.sleep(settings.load_retry_s)
            with contextlib.suppress(ModelLoadError):
                await reload("retry")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import torch

        threads = torch.get_num_threads()
        # One intra-op thread: concurrency comes from batching, and more threads only fight
        # over the cores with the event loop.
        torch.set_num_threads(settings.torch_threads)
        batcher.start()
        retry: asyncio.Task | None = None
        try:
            await reload("startup")
        except ModelLoadError:
            retry = asyncio.create_task(retry_initial_load())
        watcher = (
            asyncio.create_task(
                watch_generation(
                    shared, lambda: seen_generation, reload_generation, settings.reload_poll_s
                )
            )
            if shared is not None
            else None
        )
        loop = asyncio.get_running_loop()
        sighup = False
        try:
            loop.add_signal_handler(
                signal.SIGHUP, lambda: loop.create_task(_reload_quietly("SIGHUP"))
            )
            sighup = True
        except (NotImplementedError, RuntimeError, ValueError, AttributeError):
            log.debug("SIGHUP reload unavailable here (not the main thread or no signals)")
        try:
            yield
        finally:
            if sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            if retry:
                retry.cancel()
            if watcher:
                watcher.cancel()
                mark_worker_gone()
            await batcher.stop()
            torch.set_num_threads(threads)
            # The access lines still waiting in a batch (service.logs): uvicorn re-raises the
            # stopping signal after this, and the process ends without logging.shutdown.
            flush_logs()

    async def _reload_quietly(reason: str) -> None:
        with contextlib.suppress(ModelLoadError):
            await reload(reason)

    app = ServiceApp(
        title="icu-forecast",
        version="0.1.0",
        summary="K-step forecasts of 18 ICU state variables under planned interventions.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.holder = holder
    app.state.metrics = metrics
    app.state.reload = reload
    # POST endpoints the gateway hands their body directly (filled in below).
    direct: dict[str, DirectEndpoint] = {}
    app.put_gateway_in_front(
        partial(
            GatewayMiddleware,
            metrics=metrics,
            api_key=settings.api_key.get_secret_value() if settings.api_key else None,
            max_body_bytes=settings.max_body_bytes,
            direct=direct,
        )
    )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return _json({"detail": _clean_errors(list(exc.errors()))}, 422)

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> Response:
        return _json({"detail": _clean_errors(exc.errors)}, 422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # The message may quote input values: it goes to the log only by type, not by text.
        log.error("unhandled %s on %s", type(exc).__name__, request.url.path, exc_info=False)
        return _json({"detail": "internal error"}, 500)

    def _model_or_503() -> LoadedModel | Response:
        m = holder.current
        if m is None:
            return _json({"detail": "model not loaded yet", "error": holder.last_error}, 503)
        return m

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "no model yet"}})
    async def readyz() -> Response:
        """Readiness: 200 once a model is loaded, 503 before."""
        m = _model_or_503()
        if isinstance(m, Response):
            return m
        return _json({"status": "ready", "model": m.info.ref()})

    def _events(req: Any, loc: tuple) -> Any:
        return bin_events(req, loc, settings)

    async def _forecast(patients: list[PatientInput]) -> tuple[Any, list[Any]]:
        info, results = await batcher.submit(patients)
        metrics.forecasts.inc(len(patients))
        kinds: dict[str, int] = {}
        for p in patients:
            for w in p.warnings:
                kinds[w["kind"]] = kinds.get(w["kind"], 0) + 1
        metrics.count_warnings(kinds)
        return info, results

    async def forecast_body(body: bytes) -> Response:
        m = _model_or_503()
        if isinstance(m, Response):
            return m
        req = _parse(ForecastRequest, body)
        p = patient_input(req, ("body",), _events)
        info, results = await _forecast([p])
        return _json(_patient_payload(p, results[0]) | {"model": info.ref()})

    async def forecast_batch_body(body: bytes) -> Response:
        m = _model_or_503()
        if isinstance(m, Response):
            return m
        req = _parse(BatchRequest, body)
        patients: list[PatientInput] = []
        errors: list[dict[str, Any]] = []
        for i, r in enumerate(req.patients):
            try:
                patients.append(patient_input(r, ("body", "patients", i), _events))
            except InputError as exc:
                errors.extend(exc.errors)
        if errors:
            raise InputError(errors)
        info, results = await _forecast(patients)
        return _json(
            {
                "model": info.ref(),
                "results": [_patient_payload(p, r) for p, r in zip(patients, results, strict=True)],
            }
        )

    direct["/v1/forecast"] = DirectEndpoint(forecast_body, log)
    direct["/v1/forecast/batch"] = DirectEndpoint(forecast_batch_body, log)

    # The routes below document the two endpoints in OpenAPI and serve them should the gateway
    # not be in front; requests normally reach the bodies above through ``DirectEndpoint``.
    @app.post(
        "/v1/forecast",
        response_model=ForecastResponse,
        tags=["forecast"],
        openapi_extra=_body_schema("ForecastRequest"),
        responses=_ERROR_RESPONSES,
    )
    async def forecast(request: Request) -> Response:
        """Forecast one patient `horizon` bins ahead, from `history` bins or raw `events`."""
        return await forecast_body(await request.body())

    @app.post(
        "/v1/forecast/batch",
        response_model=BatchResponse,
        tags=["forecast"],
        openapi_extra=_body_schema("BatchForecastRequest"),
        responses=_ERROR_RESPONSES,
    )
    async def forecast_batch(request: Request) -> Response:
        """Forecast many patients in one model call (all validated first; any error is a 422)."""
        return await forecast_batch_body(await request.body())

    @app.get("/v1/model", response_model=ModelDescription, tags=["model"])
    async def model_description() -> Response:
        """The model being served, its training data checksum, and the variables it uses."""
        m = _model_or_503()
        if isinstance(m, Response):
            return m
        i = m.info
        return _json(
            {
                "name": i.name,
                "version": i.version,
                "run_id": i.run_id,
                "uri": i.uri,
                "data_checksum": i.data_checksum,
                "loaded_at": i.loaded_at,
                "catalog_version": catalog_version(),
                "bin_hours": BIN_HOURS,
                "variables": _VARIABLES,
            }
        )

    @app.post(
        "/v1/model/reload",
        tags=["model"],
        responses={502: {"description": "loading failed; the previous model keeps serving"}},
    )
    async def model_reload() -> Response:
        """Load `MODEL_URI` again (e.g. a new `champion`); on failure the old model serves on."""
        previous = holder.current.info.ref() if holder.current else None
        try:
            loaded = await reload("endpoint")
        except ModelLoadError as exc:
            return _json(
                {"reloaded": False, "error": str(exc), "serving": previous},
                502,
            )
        # Other workers (if any) follow within reload_poll_s, each keeping its model on failure.
        broadcast_reload()
        return _json({"reloaded": True, "model": loaded.info.ref(), "previous": previous})

    @app.get("/v1/variables", response_model=list[VariableInfo], tags=["model"])
    async def variables() -> Response:
        """The 18 state variables and 3 interventions: units, accepted units and ranges."""
        return _json(_VARIABLES)

    @app.get("/metrics", tags=["health"])
    async def prometheus_metrics() -> Response:
        """Prometheus text format: request counts, latency histograms, model version."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        # The forecast bodies are parsed by pydantic straight from bytes (one pass, in Rust),
        # so FastAPI does not see their models: add their schemas to the document here.
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in (ForecastRequest, BatchRequest):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(js.pop("$defs", {}))
                schemas[model.__name__] = js
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def create_worker_app() -> ServiceApp:
    """The app of one worker under ``serve --workers N`` (uvicorn imports this factory).

    The settings are the supervisor's, passed down as JSON, so CLI flags reach every worker.
    """
    payload = worker_settings_payload()
    settings = ServiceSettings(**payload) if payload is not None else ServiceSettings()
    configure_worker_logging(settings.log_flush_s)
    return create_app(settings, freeze_gc=True)
