"""`icu-forecast dag run|status` through the real CLI, up to the ETL on the demo data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from features.errors import UserError
from pipeline.cli import main


def _args(tmp_path: Path, mimic: Path) -> list[str]:
    return ["--data-dir", str(tmp_path / "data"), "--mimic-dir", str(mimic)]


def test_until_etl_caches_and_reports_why(
    tmp_path: Path, mimic_dir: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    common = _args(tmp_path, mimic_dir)
    assert main(["dag", "run", "--until", "etl", *common]) == 0
    out = capsys.readouterr().out
    assert "not needed: " in out and "etl" in out and "never ran successfully" in out
    assert (tmp_path / "data/etl/bins.parquet").exists()

    assert main(["dag", "run", "--until", "etl", *common]) == 0
    out = capsys.readouterr().out
    assert "[dag] etl" in out and "SKIP    unchanged since" in out

    assert main(["dag", "run", "--until", "etl", "--seed", "1", *common]) == 0
    out = capsys.readouterr().out
    assert "param changed: seed 0 -> 1" in out

    assert main(["dag", "status", "--seed", "1", *common]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert lines["etl"].split()[1] == "done"
    assert lines["train_cfc"].split()[1] == "missing"
    assert main(["dag", "status", *common]) == 0  # back to seed 0: the ETL is stale
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert "stale" in lines["etl"] and "param changed: seed 1 -> 0" in lines["etl"]

    state = json.loads((tmp_path / "data/dag/state.json").read_text())
    assert set(state["steps"]) == {"etl"}
    assert state["steps"]["etl"]["fingerprint"]["params"]["seed"] == 1


def test_failed_fetch_exits_nonzero_and_is_recorded(
    tmp_path: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    busy = tmp_path / "not-mimic"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    assert main(["dag", "run", *_args(tmp_path, busy)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "not empty but holds no ICUSTAYS" in out
    assert "BLOCKED" in out
    assert main(["dag", "status", *_args(tmp_path, busy)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.split()[:2] == ["fetch", "failed"]


def test_bad_settings_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "never.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    assert main(["dag", "status", "--models", "cfc,tree", *_args(tmp_path, tmp_path)]) == 2
    assert "unknown model(s) ['tree']" in capsys.readouterr().err
    assert main(["dag", "run", "--force", "nope", *_args(tmp_path, tmp_path)]) == 2
    assert "--force: unknown step(s) nope" in capsys.readouterr().err
    assert main(["dag", "status", "--paper", "--epochs", "3", *_args(tmp_path, tmp_path)]) == 2
    assert not store.exists(), "a rejected request must not create the MLflow store"


def test_flags_override_environment_which_overrides_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from pipeline.dag.command import configure, settings_from_args
    from pipeline.dag.settings import DagSettings
    from pipeline.dag.training_api import train_config

    for var in ("MIMIC_DIR", "MLFLOW_TRACKING_URI", "ICU_DAG_EPOCHS", "ICU_DAG_MODELS"):
        monkeypatch.delenv(var, raising=False)
    default = DagSettings()
    assert default.epochs is None and default.preset == "default"  # the preset decides
    assert train_config(default, "gru").objective == "closed_loop"
    assert DagSettings().tracking_uri == "sqlite:///mlflow.db"
    monkeypatch.setenv("MIMIC_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("ICU_DAG_EPOCHS", "7")
    monkeypatch.setenv("ICU_DAG_MODELS", "gru,cfc")
    parser = argparse.ArgumentParser()
    configure(parser)
    s = settings_from_args(parser.parse_args(["run"]))
    assert (s.mimic_dir, s.epochs, s.models) == (tmp_path / "m", 7, ("gru", "cfc"))
    s = settings_from_args(parser.parse_args(["run", "--epochs", "3", "--mimic-dir", "x"]))
    assert (s.mimic_dir, s.epochs) == (Path("x"), 3)
    paper = settings_from_args(parser.parse_args(["status", "--paper"]))
    assert paper.preset == "paper"
    cfg = train_config(paper, "cfc")
    assert (cfg.epochs, cfg.objective, cfg.batch_size) == (7, "teacher_forced", 64)  # env epochs
    monkeypatch.delenv("ICU_DAG_EPOCHS")
    cfg = train_config(settings_from_args(parser.parse_args(["status", "--paper"])), "cfc")
    assert cfg.epochs == 30
    with pytest.raises(UserError, match="--paper and --epochs disagree"):
        settings_from_args(parser.parse_args(["status", "--paper", "--epochs", "3"]))


def test_a_train_steps_parameters_are_the_settings_that_shape_its_model(monkeypatch) -> None:
    """The direct ridge's settings change level-direct's model, so its step re-runs when
    they change; the networks' optimiser settings leave the baselines' steps cached."""
    from pipeline.dag.settings import DagSettings
    from pipeline.dag.training_api import train_params

    s = DagSettings()
    before = {m: train_params(s, m) for m in ("level-direct", "level", "cfc")}
    monkeypatch.setenv("ICU_TRAIN_DIRECT_WEIGHT", "0.3")
    assert train_params(s, "level-direct") != before["level-direct"]
    assert train_params(s, "cfc") != before["cfc"]
    monkeypatch.delenv("ICU_TRAIN_DIRECT_WEIGHT")
    monkeypatch.setenv("ICU_TRAIN_LR", "0.01")
    assert train_params(s, "level-direct") == before["level-direct"]
    assert train_params(s, "level") == before["level"]
