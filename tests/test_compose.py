"""docker-compose.yml and the Dockerfile, checked without a Docker engine (there is none here).

The compose file is parsed with PyYAML (YAML merge keys resolve the shared ``x-app`` block)
and checked for what `docker compose up` relies on: services, ports, volumes, healthchecks,
dependencies and environment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib


@pytest.fixture(scope="module")
def compose(repo_root: Path) -> dict[str, Any]:
    return yaml.safe_load((repo_root / "docker-compose.yml").read_text())


def _pinned_mlflow(repo_root: Path) -> SpecifierSet:
    deps = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"mlflow\b", d))
    return SpecifierSet(spec.removeprefix("mlflow"))


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of the service's short-syntax volumes (``source:target[:mode]``)."""
    out = {}
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        if parts[-1] in {"ro", "rw"}:
            parts = parts[:-1]
        out[parts[-1]] = ":".join(parts[:-1])  # the source may hold ":-" defaults
    return out


def _healthcheck_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    joined = " ".join(test) if isinstance(test, list) else test
    match = re.search(r"https?://[^'\" ]+", joined)
    assert match, f"healthcheck does not probe a URL: {joined}"
    return match.group(0)


def test_services_exist(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"mlflow", "pipeline", "api"}


def test_mlflow_is_the_official_image_at_the_pinned_version(
    compose: dict[str, Any], repo_root: Path
) -> None:
    mlflow = compose["services"]["mlflow"]
    image, _, tag = mlflow["image"].partition(":")
    assert image == "ghcr.io/mlflow/mlflow"
    version = tag.removeprefix("v")
    assert version in _pinned_mlflow(repo_root), f"{tag} outside pyproject's mlflow pin"
    cmd = " ".join(mlflow["command"])
    assert "--serve-artifacts" in cmd
    backend = re.search(r"--backend-store-uri[= ](\S+)", cmd).group(1)
    assert backend.startswith(("sqlite:////", "postgresql"))
    # the store lives on a named volume, not in the container's writable layer
    volumes = {source: target for target, source in _mounts(mlflow).items()}
    assert "mlflow-store" in volumes and "mlflow-store" in compose["volumes"]
    if backend.startswith("sqlite:////"):
        assert backend.removeprefix("sqlite:///").startswith(volumes["mlflow-store"])
    allowed = re.search(r"--allowed-hosts[= ](\S+)", cmd).group(1).split(",")
    assert "mlflow:5000" in allowed, "other containers reach the server as mlflow:5000"
    assert "localhost:5000" in allowed
    assert mlflow["ports"] == ["127.0.0.1:5000:5000"], "published on the host's loopback only"
    assert _healthcheck_url(mlflow).startswith("http://localhost:5000/health")


def test_pipeline_is_a_one_shot_dag_run_logging_to_mlflow(compose: dict[str, Any]) -> None:
    pipeline = compose["services"]["pipeline"]
    assert pipeline["command"] == ["dag", "run"]
    assert pipeline["build"] == "."
    assert pipeline.get("restart") == "no"
    env = _env(pipeline)
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    mounts = _mounts(pipeline)
    assert env["MIMIC_DIR"] in mounts, "MIMIC_DIR must point at the mounted MIMIC folder"
    assert mounts[env["MIMIC_DIR"]] == "${MIMIC_DIR:-./data/raw/mimic-iii-demo}"
    assert mounts["/app/data"] == "pipeline-data", "the DAG state must outlive the container"
    assert pipeline["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_api_serves_the_champion_with_a_readyz_healthcheck(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    env = _env(api)
    assert env["MODEL_URI"] == "models:/icu-forecast-cfc@champion"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # The safe setup is the default: loopback on the host, and no start without a key.
    assert api["ports"] == ["127.0.0.1:8000:8000"]
    assert re.fullmatch(r"\$\{API_KEY:\?[^}]+\}", env["API_KEY"]), env["API_KEY"]
    assert "--host" in api["command"] and "0.0.0.0" in api["command"]
    assert _healthcheck_url(api).endswith("/readyz")
    assert api["depends_on"]["pipeline"]["condition"] == "service_completed_successfully"
    assert api["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    used = {
        source
        for s in compose["services"].values()
        for source in _mounts(s).values()
        if not source.startswith(("/", ".", "$"))
    }
    assert used and used <= set(compose["volumes"])


def test_dockerfile_installs_cpu_torch_and_runs_unprivileged(repo_root: Path) -> None:
    text = (repo_root / "Dockerfile").read_text()
    assert re.search(
        r"pip install torch==[\d.]+ --index-url https://download.pytorch.org/whl/cpu", text
    )
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert 'ENTRYPOINT ["icu-forecast"]' in text
    assert not re.search(r"\bgcc\b", text)  # nothing is compiled at run time
    ignored = (repo_root / ".dockerignore").read_text().split()
    for path in ("data", "mlflow.db", ".venv", ".git"):
        assert path in ignored, f".dockerignore must keep {path} out of the image"


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")  # Debian's package (.ci/run installs it)
    return [legacy] if legacy else None


@pytest.mark.parametrize("api_key", ["a-long-random-secret", "", None])
def test_compose_config_validates_and_needs_an_api_key(repo_root: Path, api_key) -> None:
    """`docker compose config` checks the file against Compose's schema; it needs no engine.
    Without a non-empty API_KEY it refuses, naming the variable."""
    cli = _compose_cli()
    if cli is None:
        why = "neither `docker compose` nor `docker-compose` is installed"
        if os.environ.get("CI") == "true":  # CI must run it (scripts/system-packages.sh)
            pytest.fail(why)
        pytest.skip(why)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    if api_key is not None:
        env["API_KEY"] = api_key
    out = subprocess.run(
        [*cli, "-f", str(repo_root / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=repo_root,
        env=env,
    )
    if api_key:
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode != 0 and "API_KEY" in out.stderr, out.stderr
