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


def _app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the project's own image (its entrypoint is ``icu-forecast``)."""
    return {name: s for name, s in compose["services"].items() if "build" in s}


def _settings_from(service: dict[str, Any], cls: type, monkeypatch, **substitutes: str) -> Any:
    """``cls`` as the program builds it inside the container: from the service's environment
    (``${VAR...}`` references replaced by ``substitutes``) and nothing from this machine."""
    for key in list(os.environ):
        if key.startswith(("ICU_", "MLFLOW_", "MIMIC_", "MODEL_", "API_")):
            monkeypatch.delenv(key)
    for key, value in _env(service).items():
        monkeypatch.setenv(key, substitutes.get(key, value))
    return cls()


def _mlflow_address(compose: dict[str, Any]) -> tuple[str, int]:
    """Where other containers reach MLflow: its service name and the port its command binds."""
    cmd = " ".join(compose["services"]["mlflow"]["command"])
    return "mlflow", int(re.search(r"--port[= ](\d+)", cmd).group(1))


def _published(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host address, container port) of each published port ``host:hostport:port``."""
    out = []
    for spec in service.get("ports", []):
        host, _, port = str(spec).rpartition(":")
        out.append((host.rpartition(":")[0], int(port)))
    return out


def test_app_services_run_commands_the_cli_accepts(compose: dict[str, Any]) -> None:
    from pipeline.cli import build_parser

    commands = {
        name: build_parser().parse_args(s["command"]) for name, s in _app_services(compose).items()
    }
    assert {name: args.command for name, args in commands.items()} == {
        "pipeline": "dag",
        "api": "serve",
    }
    assert commands["pipeline"].dag_command == "run"


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
    # The server accepts the Host header of every client: the app containers (by service
    # name) and a browser on the host (through the published port).
    host, port = _mlflow_address(compose)
    allowed = re.search(r"--allowed-hosts[= ](\S+)", cmd).group(1).split(",")
    assert f"{host}:{port}" in allowed
    published = _published(mlflow)
    assert published and all(address == "127.0.0.1" for address, _ in published)
    assert all(f"localhost:{p}" in allowed for _, p in published)
    assert {p for _, p in published} == {port}
    assert _healthcheck_url(mlflow).startswith(f"http://localhost:{port}/health")


def test_app_services_reach_mlflow_by_its_service_name(compose, monkeypatch) -> None:
    from pipeline.dag.settings import DagSettings
    from service.settings import ServiceSettings

    host, port = _mlflow_address(compose)
    pipeline = _settings_from(compose["services"]["pipeline"], DagSettings, monkeypatch)
    api = _settings_from(compose["services"]["api"], ServiceSettings, monkeypatch, API_KEY="k")
    for uri in (pipeline.tracking_uri, api.mlflow_tracking_uri):
        assert uri == f"http://{host}:{port}"


def test_pipeline_reads_the_mounted_mimic_and_keeps_its_state_on_a_volume(
    compose: dict[str, Any], repo_root: Path, monkeypatch
) -> None:
    from pipeline.dag.settings import DagSettings

    pipeline = compose["services"]["pipeline"]
    settings = _settings_from(pipeline, DagSettings, monkeypatch)
    mounts = _mounts(pipeline)
    assert mounts[str(settings.mimic_dir)] == "${MIMIC_DIR:-./data/raw/mimic-iii-demo}"
    workdir = re.search(r"^WORKDIR (\S+)", (repo_root / "Dockerfile").read_text(), re.M).group(1)
    data_dir = Path(workdir, settings.data_dir)  # a relative data_dir is under WORKDIR
    state = next(source for target, source in mounts.items() if data_dir.is_relative_to(target))
    assert state in compose["volumes"], "the DAG state must outlive the container"
    assert pipeline.get("restart") == "no", "a one-shot run must not be restarted when it ends"
    assert pipeline["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_api_serves_the_champion_on_loopback_with_a_readyz_healthcheck(
    compose: dict[str, Any], monkeypatch
) -> None:
    from fastapi.testclient import TestClient

    from pipeline.cli import build_parser
    from service.app import create_app
    from service.settings import ServiceSettings
    from training.registry import CHAMPION, OVERALL

    api = compose["services"]["api"]
    settings = _settings_from(api, ServiceSettings, monkeypatch, API_KEY="a-long-secret")
    # What the promote step of the pipeline marks as champion is what the API loads.
    assert settings.model_uri == f"models:/{OVERALL}@{CHAMPION}"
    assert settings.api_key is not None
    args = build_parser().parse_args(api["command"])
    assert args.host == "0.0.0.0", "inside the container it must listen beyond loopback"
    assert _published(api) == [("127.0.0.1", args.port)], "published on the host's loopback"
    url = _healthcheck_url(api)
    assert url.startswith(f"http://127.0.0.1:{args.port}/")
    # The probe answers "not ready" until a model serves (no model is loaded here).
    client = TestClient(create_app(settings, loader=lambda: None))
    assert client.get("/" + url.split("/", 3)[3]).status_code == 503
    # The API key is required, not defaulted: compose refuses to start without it.
    assert re.fullmatch(r"\$\{API_KEY:\?[^}]+\}", _env(api)["API_KEY"]), _env(api)["API_KEY"]
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
