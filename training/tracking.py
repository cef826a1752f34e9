"""MLflow location and small logging helpers."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from features import leftovers
from features.leftovers import host, process_gone

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "icu-forecast"
# Which process owns a run: a run still RUNNING whose process is gone was killed.
TAG_PID = "icu_forecast.pid"
TAG_HOST = "icu_forecast.host"


def tracking_uri(explicit: str | None = None) -> str:
    """An explicit URI, else ``MLFLOW_TRACKING_URI``, else the embedded SQLite store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_file(uri: str) -> Path | None:
    """The absolute path of a ``sqlite:///`` store's file (relative to this folder), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    name = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return None if name in ("", ":memory:") else Path(os.path.abspath(name))


def describe(uri: str) -> str:
    """``uri`` as a user should see it: a relative SQLite path also as the file it means."""
    db = sqlite_file(uri)
    return f"{uri} ({db})" if db is not None and str(db) != uri.removeprefix("sqlite:///") else uri


def missing_store(uri: str) -> str | None:
    """Why ``uri`` names no store (a SQLite file that does not exist), else None.

    Connecting to a SQLite URI creates an empty database, so commands that only read (serve,
    compare, dag status) check first instead of leaving an empty ``mlflow.db`` wherever they
    were started.
    """
    db = sqlite_file(uri)
    if db is None or db.exists():
        return None
    return (
        f"no MLflow store at {db} (tracking URI {uri}); run from the folder that holds it or "
        "set MLFLOW_TRACKING_URI / --tracking-uri"
    )


def require_store(uri: str | None = None) -> str:
    """The resolved URI of an existing store; a :class:`UserError` naming the file if none."""
    from features.errors import UserError

    resolved = tracking_uri(uri)
    why = missing_store(resolved)
    if why:
        raise UserError(why)
    return resolved


def create_store(uri: str) -> None:
    """Create a SQLite store that does not exist yet as a whole, or not at all.

    MLflow builds a new SQLite database by running its schema migrations one statement at a
    time; a process killed in the middle leaves a half-built file on which every later run
    fails ("table ... already exists"). So the database is built under a temporary name
    (owner-marked: a killed build is removed by the next) and linked into place when complete.
    """
    db = sqlite_file(uri)
    if db is None or db.exists():
        return
    from mlflow import MlflowClient

    db.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{db.name}."
    leftovers.remove_stale(db.parent, prefix)
    tmp = db.with_name(f"{prefix}{leftovers.owner_mark()}tmp")
    try:
        MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            os.link(tmp, db)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)


def setup(uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow (tracking and registry) at ``uri`` and select the experiment."""
    import mlflow

    resolved = tracking_uri(uri)
    create_store(resolved)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or resolved)
    # For a SQLite store, artifacts go to mlruns/ next to the database file: MLflow's default
    # (./mlruns here) would scatter a temporary store's artifacts wherever a run starts.
    db = sqlite_file(resolved)
    location = None if db is None else (db.resolve().parent / "mlruns").as_uri()
    if location is not None and mlflow.get_experiment_by_name(experiment) is None:
        from mlflow.exceptions import MlflowException

        # A concurrent run may create it meanwhile; set_experiment below then just selects it.
        with contextlib.suppress(MlflowException):
            mlflow.create_experiment(experiment, artifact_location=location)
    exp = mlflow.set_experiment(experiment)
    # Every run this process starts through the fluent API carries its owner (MLflow adds the
    # tags of MLFLOW_RUN_CONTEXT to each new run).
    context = json.loads(os.environ.get("MLFLOW_RUN_CONTEXT") or "{}")
    os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps(context | owner_tags())
    end_abandoned_runs(mlflow.MlflowClient(resolved), [exp.experiment_id])
    return resolved


def owner_tags() -> dict[str, str]:
    """Run tags naming this process, so a later run can tell when it was killed."""
    return {TAG_PID: str(os.getpid()), TAG_HOST: host()}


def end_abandoned_runs(client: Any, experiment_ids: Iterable[str]) -> int:
    """Mark KILLED the RUNNING runs of ``experiment_ids`` whose process is gone.

    A run killed with its process (``kill -9``, a lost machine) would otherwise stay RUNNING
    forever. Only runs that name their process (:func:`owner_tags`) on this machine are
    judged; others are left as they are. Returns how many runs were marked.
    """
    ids = list(experiment_ids)
    if not ids:
        return 0
    marked = 0
    runs = client.search_runs(ids, filter_string="attributes.status = 'RUNNING'", max_results=5000)
    for run in runs:
        tags = run.data.tags
        pid = tags.get(TAG_PID, "")
        other = tags.get(TAG_HOST) == host() and pid.isdigit() and int(pid) != os.getpid()
        if not other or not process_gone(int(pid), run.info.start_time / 1000):
            continue
        client.set_tag(
            run.info.run_id,
            "icu_forecast.ended",
            f"process {pid} on {host()} stopped without ending the run; "
            f"marked KILLED by process {os.getpid()}",
        )
        client.set_terminated(run.info.run_id, status="KILLED")
        log.warning(
            "MLflow run %s (%s) was left RUNNING by process %s, which is gone: marked KILLED",
            run.info.run_id,
            run.info.run_name,
            pid,
        )
        marked += 1
    return marked


def code_version() -> str:
    """The git commit of the code (``+dirty`` with local changes), else the package version."""
    root = Path(__file__).resolve().parents[1]
    git = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True, timeout=5)
    try:
        rev = git(["git", "rev-parse", "HEAD"])
        if rev.returncode == 0:
            dirty = git(["git", "status", "--porcelain", "--untracked-files=no"])
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("icu-forecast")
    except PackageNotFoundError:
        return "unknown"
