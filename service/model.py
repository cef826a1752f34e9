"""Loading the registered model, holding it, swapping it on reload, and calling it in batches."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from features.catalog import N_INTERVENTION, N_STATE
from service.requests import PatientInput
from service.settings import ServiceSettings

if TYPE_CHECKING:  # torch and the training code load with the first model, not on import
    from training.forecaster import Forecaster

log = logging.getLogger("icu_forecast.service")


@dataclass
class PatientResult:
    """One patient's forecast: values (H, 18) and, when the model carries a calibration,
    ``{level key ("0.8"): (lower, upper)}`` each (H, 18)."""

    values: np.ndarray
    intervals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str | None
    run_id: str | None
    uri: str
    data_checksum: str | None = None
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def ref(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id}


@dataclass(frozen=True)
class LoadedModel:
    info: ModelInfo
    forecaster: Forecaster


class ModelLoadError(Exception):
    pass


def load_from_mlflow(model_uri: str, tracking_uri: str) -> LoadedModel:
    """Resolve ``model_uri`` to one concrete version, then load exactly that version.

    Resolving first means the version reported is the one loaded even if the alias moves
    while the artifacts download. The store is passed to each MLflow call (no process-wide
    URI is set), so a service embedded in another process leaves that process's MLflow alone.
    """
    import mlflow
    from mlflow import MlflowClient

    from training import tracking

    if why := tracking.missing_store(tracking_uri):
        raise ModelLoadError(f"could not load {model_uri!r}: {why}")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, version, run_id, load_uri = model_uri, None, None, model_uri
    try:
        if model_uri.startswith("models:/"):
            spec = model_uri.removeprefix("models:/")
            if "@" in spec:
                name, alias = spec.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, _, ver = spec.partition("/")
                mv = client.get_model_version(name, ver)
            version, run_id = str(mv.version), mv.run_id
            # Where that version's files are: a path, or mlflow-artifacts:/ on a server.
            load_uri = client.get_model_version_download_uri(name, version)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=load_uri, tracking_uri=tracking_uri
        )
        pyfunc = mlflow.pyfunc.load_model(local)
        forecaster = pyfunc.unwrap_python_model().forecaster
        if run_id is None:
            run_id = pyfunc.metadata.run_id
        checksum = getattr(forecaster, "data_checksum", None)
        if checksum is None and run_id:  # a model logged before the forecaster carried it
            checksum = client.get_run(run_id).data.tags.get("data_checksum")
    except Exception as exc:  # any failure must leave the previous model serving
        raise ModelLoadError(
            f"could not load {model_uri!r} from MLflow store {tracking.describe(tracking_uri)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    info = ModelInfo(name, version, run_id, model_uri, checksum)
    return LoadedModel(info, forecaster)


def check_forecasts(model: LoadedModel) -> None:
    """One small forecast before a model serves (and before /readyz says so).

    A model that cannot forecast at all is refused here, so a reload keeps the previous one
    serving; and a model's first call does once-only work (preparing its weights) that would
    otherwise land on the first request.
    """
    import torch

    uri, forecaster = model.info.uri, model.forecaster
    if not callable(getattr(forecaster, "forecast", None)):
        raise ModelLoadError(f"{uri!r}: the python model has no forecaster.forecast")
    state = np.full((1, 2, N_STATE), np.nan)
    interventions = np.full((1, 2, N_INTERVENTION), np.nan)
    planned = np.zeros((1, 2, N_INTERVENTION))
    try:
        with torch.inference_mode():
            out = np.asarray(forecaster.forecast(state, interventions, np.array([2]), planned))
    except Exception as exc:
        raise ModelLoadError(
            f"{uri!r}: a test forecast failed: {type(exc).__name__}: {exc}"
        ) from exc
    if out.shape != (1, 2, N_STATE) or not np.isfinite(out).all():
        raise ModelLoadError(
            f"{uri!r}: a test forecast gave {out.shape} values, not all finite; expected "
            f"{(1, 2, N_STATE)} finite values"
        )


Loader = Callable[[], LoadedModel]


class ModelHolder:
    """The model being served. A reload swaps it in one assignment, or leaves it untouched."""

    def __init__(self, loader: Loader, on_change: Callable[[LoadedModel], None]):
        self._loader = loader
        self._on_change = on_change
        self._lock = asyncio.Lock()
        self.current: LoadedModel | None = None
        self.last_error: str | None = None

    def _load_and_check(self) -> LoadedModel:
        loaded = self._loader()
        check_forecasts(loaded)  # whatever the loader: a model that cannot forecast never serves
        return loaded

    async def reload(self) -> LoadedModel:
        """Load in a worker thread (serving goes on meanwhile); raise ModelLoadError on failure."""
        async with self._lock:
            t0 = time.perf_counter()
            try:
                loaded = await asyncio.to_thread(self._load_and_check)
            except Exception as exc:
                self.last_error = str(exc) if isinstance(exc, ModelLoadError) else repr(exc)
                kept = self.current.info.version if self.current else None
                log.error("model load failed (still serving version %s): %s", kept, exc)
                raise ModelLoadError(self.last_error) from exc
            self.current = loaded
            self.last_error = None
            self._on_change(loaded)
            log.info(
                "model loaded: %s version %s (run %s) in %.1f s",
                loaded.info.name,
                loaded.info.version,
                loaded.info.run_id,
                time.perf_counter() - t0,
            )
            return loaded


def pad_batch(
    patients: list[PatientInput],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The Forecaster's arguments for ``patients``: state, interventions, lengths, planned,
    padded to the longest history and horizon."""
    b = len(patients)
    t_max = max(p.n_bins for p in patients)
    state = np.full((b, t_max, N_STATE), np.nan)
    iv = np.full((b, t_max, N_INTERVENTION), np.nan)
    planned = np.zeros((b, max(p.horizon for p in patients), N_INTERVENTION))
    for i, p in enumerate(patients):
        state[i, : p.n_bins] = p.state
        iv[i, : p.n_bins] = p.interventions
        planned[i, : p.horizon] = p.planned
    return state, iv, np.array([p.n_bins for p in patients], dtype=np.int64), planned


def run_batch(
    model: LoadedModel, patients: list[PatientInput], threads: int | None = None
) -> list[PatientResult]:
    """One Forecaster call for all ``patients`` (padded to the longest history and horizon).

    ``threads``: intra-op threads for this call only (the previous setting is restored).
    Intervals come from the forecaster's conformal calibration, one call for the union of the
    levels the patients asked for (a model without one gives values only).
    """
    import torch

    state, iv, lengths, planned = pad_batch(patients)
    b, h_max = len(patients), planned.shape[1]
    previous = torch.get_num_threads()
    if threads and threads != previous:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out = np.asarray(model.forecaster.forecast(state, iv, lengths, planned))
    finally:
        if threads and threads != previous:
            torch.set_num_threads(previous)
    if out.shape != (b, h_max, N_STATE):
        raise RuntimeError(f"forecaster returned shape {out.shape}, expected {(b, h_max, N_STATE)}")
    # The levels each patient gets: those asked for, else the calibration's defaults; none when
    # the model has no calibration (models logged before intervals existed).
    calibration = getattr(model.forecaster, "calibration", None)
    wanted: list[tuple[float, ...]] = [() for _ in patients]
    if calibration is not None and callable(getattr(model.forecaster, "intervals", None)):
        default = tuple(calibration.levels)
        wanted = [default if p.interval_levels is None else p.interval_levels for p in patients]
    bands: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    if any(wanted):
        union = tuple(sorted({lv for w in wanted for lv in w}))
        bands = model.forecaster.intervals(out, state, lengths, union)
    return [
        PatientResult(
            out[i, : p.horizon],
            {
                f"{lv:g}": (bands[lv][0][i, : p.horizon], bands[lv][1][i, : p.horizon])
                for lv in wanted[i]
            },
        )
        for i, p in enumerate(patients)
    ]


@dataclass
class _Job:
    patients: list[PatientInput]
    future: asyncio.Future


class MicroBatcher:
    """Gathers concurrent forecast requests into one model call.

    There is no timer: while one model call runs, new jobs queue up, and the next call takes
    all of them, and all that keep arriving turn after turn of the event loop. Under light load
    a request goes alone after one turn of the loop; under heavy load batches grow and the
    per-request cost drops. Model calls never overlap (one worker task awaits each in turn),
    so the model needs no locking.
    """

    def __init__(
        self, holder: ModelHolder, settings: ServiceSettings, on_batch: Callable[[int], None]
    ):
        self._holder = holder
        self._settings = settings
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(self, patients: list[PatientInput]) -> tuple[ModelInfo, list[PatientResult]]:
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(patients, fut))
        return await fut

    async def _worker(self) -> None:
        limit = self._settings.micro_batch_max
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0].patients)
            # Let the requests already read enqueue too: turn the loop until a turn brings no
            # new job. Concurrent clients' requests arrive a few at a time, and a model call
            # started on the first few would make the rest wait for it and then pay the
            # call's fixed cost again (most of a small call: 2 patients cost ~2 ms, 16 ~5 ms).
            while size < limit:
                await asyncio.sleep(0)
                if self._queue.empty():
                    break
                while size < limit and not self._queue.empty():
                    job = self._queue.get_nowait()
                    jobs.append(job)
                    size += len(job.patients)
            jobs = [j for j in jobs if not j.future.done()]  # cancelled by a gone client
            model = self._holder.current
            if model is None:
                for j in jobs:
                    j.future.set_exception(ModelLoadError("no model loaded"))
            elif jobs:
                await self._call(model, jobs)

    async def _call(self, model: LoadedModel, jobs: list[_Job]) -> None:
        patients = [p for j in jobs for p in j.patients]
        # A large call (the batch endpoint) is compute-bound and alone: a second intra-op
        # thread uses the core the event loop leaves idle while it waits. Small calls stay on
        # one thread, where threading costs more than it saves.
        big = len(patients) >= self._settings.parallel_batch_min
        threads = self._settings.parallel_threads if big else None
        try:
            # In the loop's own thread: no thread hop and no GIL hand-offs. While the model
            # runs, new requests wait in the socket buffers and form the next batch; with one
            # core per process this is the faster choice (a worker thread measured slower).
            results = run_batch(model, patients, threads)
        except Exception as exc:
            if len(jobs) == 1:
                if not jobs[0].future.done():
                    jobs[0].future.set_exception(exc)
                return
            # One request's failure must not fail the others it happened to share a call
            # with: run them one by one, so only the culprit gets the error.
            for j in jobs:
                await self._call(model, [j])
            return
        self._on_batch(len(patients))
        k = 0
        for j in jobs:
            n = len(j.patients)
            if not j.future.done():
                j.future.set_result((model.info, results[k : k + n]))
            k += n
