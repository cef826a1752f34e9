"""The quick start's closing advice works as printed: its `dag status` and `dag run` lines see
the data folder, tables and MLflow store the quick start used, from any folder."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_printed_dag_commands_see_what_the_quick_start_made(
    tmp_path: Path, mimic_dir: Path
) -> None:
    # A checkout whose install step is already done: .venv/bin/icu-forecast is this code.
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts/quickstart.sh", root / "scripts/quickstart.sh")
    (root / "scripts/install.sh").write_text("echo install skipped\n")
    venv_bin = root / ".venv/bin"
    venv_bin.mkdir(parents=True)
    cli = venv_bin / "icu-forecast"
    cli.write_text(
        f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(REPO))} exec {shlex.quote(sys.executable)} "
        '-m pipeline.cli "$@"\n'
    )
    cli.chmod(0o755)
    # The shared demo copy next to the checkout, as on the team's machines.
    (tmp_path / "shared/data").mkdir(parents=True)
    (tmp_path / "shared/data/mimic-iii-demo").symlink_to(mimic_dir)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MIMIC_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PYTHONPATH")
        and not k.startswith("ICU_")
    }
    flags = ["--models", "persistence", "--seed", "1"]
    res = subprocess.run(
        ["bash", "scripts/quickstart.sh", *flags, "--until", "promote"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    advice = [line.strip() for line in res.stdout.splitlines() if "icu-forecast dag " in line]
    status_line = next(v for v in advice if "icu-forecast dag status" in v)
    run_line = next(v for v in advice if "icu-forecast dag run" in v)
    assert "--until" not in status_line and "--seed 1" in status_line
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    status = subprocess.run(
        ["bash", "-c", status_line], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    steps = [line.split() for line in status.stdout.splitlines()]
    assert [s[0] for s in steps] == ["fetch", "etl", "train_persistence", "compare", "promote"]
    assert all(s[1] == "done" for s in steps), status.stdout
    rerun = subprocess.run(
        ["bash", "-c", run_line], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert " RUN " not in rerun.stdout and rerun.stdout.count(" SKIP ") == 5, rerun.stdout
    assert list(elsewhere.iterdir()) == []  # nothing written where the commands ran
    assert not (root / "data/raw").exists()  # the shared demo was used, not a download
