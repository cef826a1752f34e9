"""Killed runs leave nothing behind for long: the next run removes their scratch and staging
folders and ends their MLflow runs, and never touches what it did not create."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from features import leftovers
from features.atomic import atomic_dir, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _killed_midway(code: str, ready: Path) -> None:
    """Run ``code`` in a child that touches ``ready`` when it is mid-work, then kill -9 it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}
    )
    try:
        for _ in range(600):
            if ready.exists() or proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.05"])
        assert ready.exists(), "the child never got to the point where it is killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_killed_atomic_dir_staging_is_removed_on_the_next_write(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as staging:
        (staging / "a.txt").write_text("first")
    ready = tmp_path / "ready"
    _killed_midway(
        "from features.atomic import atomic_dir\n"
        "import pathlib, time\n"
        f"with atomic_dir({str(out)!r}) as s:\n"
        "    (s / 'a.txt').write_text('half')\n"
        f"    pathlib.Path({str(ready)!r}).touch()\n"
        "    time.sleep(60)\n",
        ready,
    )
    debris = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.staging-")]
    assert len(debris) == 1
    assert (out / "a.txt").read_text() == "first"  # the killed run changed nothing
    with atomic_dir(out) as staging:
        (staging / "a.txt").write_text("second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ready"]
    assert (out / "a.txt").read_text() == "second"


def test_a_live_runs_staging_and_foreign_files_are_kept(tmp_path: Path) -> None:
    live = subprocess.Popen(["sleep", "60"])
    try:
        mark = f"{live.pid}@{leftovers.host()}."
        kept = [
            tmp_path / f".out.staging-{mark}abc",  # a run still going
            tmp_path / ".out.staging-mine",  # not an owner mark: the user's
            tmp_path / f".out.staging-{_dead_pid()}@another-host.x",  # cannot be checked
            tmp_path / f".other.staging-{_dead_pid()}@{leftovers.host()}.x",  # other output
        ]
        for p in kept:
            p.mkdir()
        with atomic_dir(tmp_path / "out") as staging:
            (staging / "f").write_text("x")
        for p in kept:
            assert p.is_dir(), p
    finally:
        live.kill()
        live.wait()


def test_a_kill_between_the_swaps_renames_restores_the_previous_output(tmp_path: Path) -> None:
    # The state a kill leaves after "old output set aside" and before "new output in place".
    mark = f"{_dead_pid()}@{leftovers.host()}."
    old = tmp_path / f".out.old-{mark}abc"
    old.mkdir()
    (old / "bins.parquet").write_text("previous")
    half = tmp_path / f".out.staging-{mark}def"
    half.mkdir()
    (half / "bins.parquet").write_text("new")
    from features.atomic import recover

    recover(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "bins.parquet").read_text() == "previous"


def test_temporary_files_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    stale = tmp_path / f".state.json.{_dead_pid()}@{leftovers.host()}.x1.tmp"
    stale.write_text("{")
    user = tmp_path / ".state.json.backup"
    user.write_text("mine")
    atomic_write_text(target, "{}")
    assert not stale.exists()
    assert user.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state.json.backup", "state.json"]


def test_a_reused_pid_does_not_keep_debris_alive(tmp_path: Path) -> None:
    # A process that started after the leftover was last written cannot be its owner.
    started = leftovers.psutil.Process(os.getppid()).create_time()
    assert leftovers.process_gone(os.getppid(), made_at=started - 10)
    assert not leftovers.process_gone(os.getppid(), made_at=started + 10)
    assert leftovers.process_gone(_dead_pid())


@pytest.mark.slow
def test_a_killed_train_run_is_marked_killed_by_the_next(tmp_path: Path, mlflow_uri: str) -> None:
    import mlflow

    from training import tracking

    ready = tmp_path / "ready"
    _killed_midway(
        "import mlflow, pathlib, time\n"
        "from training import tracking\n"
        f"tracking.setup({mlflow_uri!r}, 'exp')\n"
        "mlflow.start_run(run_name='doomed')\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n",
        ready,
    )
    live = subprocess.Popen(["sleep", "60"])
    try:
        client = mlflow.MlflowClient(mlflow_uri)
        exp = client.get_experiment_by_name("exp")
        other = client.create_run(
            exp.experiment_id,
            tags={tracking.TAG_PID: str(live.pid), tracking.TAG_HOST: leftovers.host()},
        )
        untagged = client.create_run(exp.experiment_id)
        tracking.setup(mlflow_uri, "exp")
        runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
        assert runs["doomed"].info.status == "KILLED"
        assert "stopped without ending the run" in runs["doomed"].data.tags["icu_forecast.ended"]
        assert client.get_run(other.info.run_id).info.status == "RUNNING"  # owner alive
        assert client.get_run(untagged.info.run_id).info.status == "RUNNING"  # owner unknown
        with mlflow.start_run() as run:
            tags = mlflow.get_run(run.info.run_id).data.tags
        assert tags[tracking.TAG_PID] == str(os.getpid())
    finally:
        live.kill()
        live.wait()
