"""Fault suite: ``kill -9`` at random points of the ETL and of ``dag run`` on the demo data,
then run again. After every kill the previous output is intact (or set aside whole, if the kill
split the swap), earlier runs' leftovers are gone, and the rerun rebuilds the same output with
nothing left behind and no MLflow run left RUNNING. Prints what was tried."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from features.leftovers import host

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SEED = 20261130


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICU_", "MLFLOW_"))}
    return env | {"PYTHONPATH": str(REPO)} | extra


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _complete_output(folder: Path) -> str:
    """The bins digest of a whole ETL output: the card names exactly the bins beside it."""
    card = json.loads((folder / "data_card.json").read_text())
    assert card["bins_sha256"] == _sha(folder / "bins.parquet")
    return card["bins_sha256"]


def _kill_at(
    cmd: list[str], delay: float, cwd: Path, env: dict[str, str], started: Path, prefix: str
) -> tuple[int, bool]:
    """Start ``cmd``; once its ``prefix<pid>@...`` folder appears under ``started`` (it has
    begun that part of its work), SIGKILL it after ``delay`` seconds.
    Returns (pid, whether it was still running)."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Python and DuckDB take a second to start; killing there would test little.
    mark = f"{prefix}{proc.pid}@"
    while proc.poll() is None and not any(p.name.startswith(mark) for p in started.iterdir()):
        time.sleep(0.005)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    running = proc.poll() is None
    proc.kill()
    proc.wait()
    return proc.pid, running


def _marked(folder: Path) -> list[Path]:
    """Everything under ``folder`` whose name carries an owner mark (a run's own scratch)."""
    return [p for p in folder.rglob("*") if f"@{host()}." in p.name]


def _owners(names) -> set[str]:
    return {m.group(1) for n in names if (m := re.search(r"(\d+)@" + re.escape(host()), n))}


def test_etl_killed_at_random_points_then_rerun(tmp_path: Path, mimic_dir: Path) -> None:
    rng = random.Random(SEED)
    work = tmp_path / "work"
    out = work / "etl"
    cmd = _cli("etl", "--mimic-dir", str(mimic_dir), "--out", str(out), "--no-progress")
    env = _env()
    first = subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    # The command's last line ends with the ETL's own duration ("..., 1.6 s").
    full = float(first.stdout.decode().strip().splitlines()[-1].rsplit(" ", 2)[-2])
    baseline = _complete_output(out)

    phases: Counter[str] = Counter()
    runs = 8
    for i in range(runs):
        # Half from the start of the work (scratch made), half from the start of the writing.
        if i % 2:
            where = (rng.uniform(0.0, 0.04), ".etl.staging-")
        else:
            where = (rng.uniform(0.0, full), ".etl-work-")
        _, running = _kill_at(cmd, where[0], tmp_path, env, work, where[1])
        left = [p.name for p in work.iterdir() if p.name != "etl"]
        # One killed run's leftovers at most: each run that got going removed the earlier ones.
        assert len(_owners(left)) <= 1 and len(left) == len(_marked(work)), left
        if not running:
            phases["finished before the kill"] += 1
        elif any(".staging-" in n or ".old-" in n for n in left):
            phases["killed while writing the output"] += 1
        elif left:
            phases["killed while reading / binning"] += 1
        else:
            phases["killed after the swap (nothing to clean)"] += 1
        if out.exists():
            assert _complete_output(out) == baseline
        else:  # the kill fell between the swap's two renames: the old output is set aside
            (old,) = [p for p in work.iterdir() if p.name.startswith(".etl.old-")]
            assert _complete_output(old) == baseline

    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    assert sorted(p.name for p in work.iterdir()) == ["etl"]
    assert _complete_output(out) == baseline
    print(
        f"\nETL fault suite (seed {SEED}): {runs} runs SIGKILLed at random times (0..{full:.1f} s "
        f"into the work, or 0..0.04 s into the writing): {dict(phases)}; output intact after "
        "each, rerun identical, nothing left behind"
    )


def _kill_during(cmd: list[str], phase: str, after: float, cwd: Path, env: dict[str, str]) -> str:
    """Start ``cmd``; once it enters ``phase`` (a ``[dag] <step> RUN`` line, or for "store"
    the temporary MLflow database appearing) wait ``after`` seconds and SIGKILL it.

    Returns what happened: "killed", or "finished" when it ended before that point.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env | {"PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    try:
        if phase == "store":
            while proc.poll() is None and not list(cwd.glob(".mlflow.db.*tmp")):
                time.sleep(0.005)
        else:
            for line in proc.stdout:
                if line.startswith("[dag]") and line.split()[1:3] == [phase, "RUN"]:
                    break
        time.sleep(after)
        if proc.poll() is not None:
            return "finished"
        proc.kill()
        return "killed"
    finally:
        proc.kill()
        proc.stdout.close()
        proc.wait()


def test_dag_run_killed_at_random_points_then_rerun(tmp_path: Path, mimic_dir: Path) -> None:
    import mlflow

    rng = random.Random(SEED)
    data = tmp_path / "data"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    flags = [
        "--models", "persistence", "--data-dir", str(data), "--tracking-uri", uri,
        "--mimic-dir", str(mimic_dir),
    ]  # fmt: skip
    cmd = _cli("dag", "run", *flags)
    env = _env()
    # Each phase in turn, killed a random time into it; steps done before are cached, so each
    # run gets one phase further. "store": while MLflow builds the new SQLite database.
    tried = []
    for phase in ("store", "etl", "train_persistence", "promote"):
        after = round(rng.uniform(0.0, 1.0), 2)
        tried.append(f"{phase}+{after}s:{_kill_during(cmd, phase, after, tmp_path, env)}")
        left = _marked(tmp_path)
        assert len(_owners(p.name for p in left)) <= 1, left
        if (data / "etl").exists():
            _complete_output(data / "etl")

    final = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "Traceback" not in final.stderr
    assert _marked(tmp_path) == []
    _complete_output(data / "etl")
    status = subprocess.run(
        _cli("dag", "status", *flags), cwd=tmp_path, env=env, capture_output=True, text=True
    )
    steps = [line.split()[:2] for line in status.stdout.splitlines()]
    assert steps and all(s == "done" for _, s in steps), status.stdout

    client = mlflow.MlflowClient(uri)
    exps = [client.get_experiment_by_name(n) for n in ("icu-forecast", "icu-forecast-dag")]
    runs_by_status = Counter(
        r.info.status for r in client.search_runs([e.experiment_id for e in exps if e])
    )
    assert runs_by_status["RUNNING"] == 0, runs_by_status
    assert runs_by_status["KILLED"] > 0  # the killed runs were found and ended
    print(
        f"\nDAG fault suite (seed {SEED}): `dag run` SIGKILLed in each phase [{', '.join(tried)}], "
        f"then one rerun: all steps done, nothing left behind; MLflow runs by status "
        f"{dict(runs_by_status)}"
    )
