"""The DAG engine on a toy pipeline: caching, change reasons, failures, --force, --until."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.dag.engine import Dag, DagError, Step, StepContext, StepResult


class Toy:
    """raw.txt -> [a] -> a.txt -> [b] -> b.txt -> [c] -> c.txt ;  raw.txt -> [d] -> d.txt"""

    def __init__(self, root: Path, module: str) -> None:
        self.root = root
        self.module = module
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.factor = 2
        self.lines: list[str] = []
        (root / "raw.txt").write_text("1\n")

    def _action(self, name: str, src: str, dst: str):
        def run(ctx: StepContext) -> StepResult:
            self.calls.append(name)
            if name in self.fail:
                raise RuntimeError(f"{name} broke")
            value = int((self.root / src).read_text())
            (self.root / dst).write_text(f"{value * self.factor}\n")
            return StepResult(metrics={"value": value})

        return run

    def dag(self) -> Dag:
        r = self.root
        steps = [
            Step(
                "a",
                self._action("a", "raw.txt", "a.txt"),
                inputs=(r / "raw.txt",),
                outputs=(r / "a.txt",),
                params={"factor": self.factor},
                code=(self.module,),
            ),
            Step(
                "b",
                self._action("b", "a.txt", "b.txt"),
                needs=("a",),
                inputs=(r / "a.txt",),
                outputs=(r / "b.txt",),
            ),
            Step(
                "c",
                self._action("c", "b.txt", "c.txt"),
                needs=("b",),
                inputs=(r / "b.txt",),
                outputs=(r / "c.txt",),
            ),
            Step(
                "d",
                self._action("d", "raw.txt", "d.txt"),
                inputs=(r / "raw.txt",),
                outputs=(r / "d.txt",),
            ),
        ]
        return Dag(steps, r / "state.json", echo=self.lines.append)

    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture()
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Toy:
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "toy_step_code.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(code_dir))
    sys.modules.pop("toy_step_code", None)
    data = tmp_path / "data"
    data.mkdir()
    return Toy(data, "toy_step_code")


def test_second_run_skips_everything(toy: Toy) -> None:
    report = toy.dag().run()
    assert report.ok and toy.calls == ["a", "b", "c", "d"]
    assert (toy.root / "c.txt").read_text() == "8\n"
    toy.calls.clear()
    toy.lines.clear()
    report = toy.dag().run()
    assert toy.calls == []
    assert [d.action for d in report.decisions] == ["skip"] * 4
    assert "SKIP" in toy.output() and "unchanged since" in toy.output()


def test_input_change_reruns_dependents_and_names_the_file(toy: Toy) -> None:
    toy.dag().run()
    toy.calls.clear()
    (toy.root / "raw.txt").write_text("3\n")
    toy.dag().run()
    assert toy.calls == ["a", "b", "c", "d"]
    assert f"input changed: {toy.root / 'raw.txt'}" in toy.output()
    assert f"input changed: {toy.root / 'a.txt'}" in toy.output()


def test_same_content_does_not_rerun(toy: Toy) -> None:
    toy.dag().run()
    toy.calls.clear()
    (toy.root / "raw.txt").write_text("1\n")  # rewritten, new mtime, same content
    toy.dag().run()
    assert toy.calls == []


def test_param_change_is_reported(toy: Toy) -> None:
    toy.dag().run()
    toy.calls.clear()
    toy.lines.clear()
    toy.factor = 5
    toy.dag().run()
    assert toy.calls[0] == "a"
    assert "param changed: factor 2 -> 5" in toy.output()


def test_code_change_is_reported(toy: Toy, tmp_path: Path) -> None:
    toy.dag().run()
    toy.calls.clear()
    toy.lines.clear()
    (tmp_path / "code" / "toy_step_code.py").write_text("X = 2\n")
    toy.dag().run()
    assert toy.calls == ["a"]  # a's output is unchanged, so b, c stay cached
    assert "code changed: toy_step_code.py" in toy.output()


@pytest.fixture()
def toy_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """toypkg (a step's declared code, with a .sql data file) imports toyhelpers.util, which
    reads a .json beside it; toypkg also imports numpy (result-shaping) and pydantic (not)."""
    code = tmp_path / "pkgcode"
    (code / "toypkg").mkdir(parents=True)
    (code / "toyhelpers").mkdir()
    (code / "toypkg" / "__init__.py").write_text("")
    (code / "toypkg" / "step.py").write_text(
        "import numpy\nimport pydantic\n\ndef run():\n    from toyhelpers.util import limit\n"
    )
    (code / "toypkg" / "query.sql").write_text("SELECT 1\n")
    (code / "toyhelpers" / "__init__.py").write_text("")
    (code / "toyhelpers" / "util.py").write_text("from . import __name__ as limit\n")
    (code / "toyhelpers" / "limits.json").write_text("{}\n")
    (code / "toyhelpers" / "unused.py").write_text("")  # a sibling the step never imports
    (code / "unrelated.py").write_text("")
    monkeypatch.syspath_prepend(str(code))
    for name in ("toypkg", "toyhelpers"):
        sys.modules.pop(name, None)
    return code


def _package_dag(tmp_path: Path) -> tuple[Dag, list[str]]:
    calls: list[str] = []
    out = tmp_path / "out.txt"

    def action(ctx: StepContext) -> None:
        calls.append("s")
        out.write_text("x")

    return Dag([Step("s", action, outputs=(out,), code=("toypkg",))], tmp_path / "s.json"), calls


@pytest.mark.parametrize(
    "changed",
    ["toypkg/query.sql", "toypkg/step.py", "toyhelpers/util.py", "toyhelpers/limits.json"],
)
def test_code_fingerprint_covers_data_files_and_imported_modules(
    toy_package: Path, tmp_path: Path, changed: str
) -> None:
    dag, calls = _package_dag(tmp_path)
    dag.run()
    (toy_package / changed).write_text((toy_package / changed).read_text() + "\n# edited\n")
    for unused in ("unrelated.py", "toyhelpers/unused.py"):
        (toy_package / unused).write_text("# not imported by the step\n")
    [decision] = _package_dag(tmp_path)[0].status()
    assert decision.status == "stale"
    assert decision.reasons == [f"code changed: {changed}"]


def test_library_versions_are_recorded_and_a_change_is_named(
    toy_package: Path, tmp_path: Path
) -> None:
    import importlib.metadata
    import json

    dag, _ = _package_dag(tmp_path)
    dag.run()
    state = json.loads((tmp_path / "s.json").read_text())
    libraries = state["steps"]["s"]["fingerprint"]["libraries"]
    numpy_version = importlib.metadata.version("numpy")
    assert libraries == {"numpy": numpy_version}  # pydantic does not shape results
    assert _package_dag(tmp_path)[0].status()[0].status == "done"

    libraries["numpy"] = "1.0.0"  # as if the run had been made before an upgrade
    (tmp_path / "s.json").write_text(json.dumps(state))
    [decision] = _package_dag(tmp_path)[0].status()
    assert decision.reasons == [f"library changed: numpy 1.0.0 -> {numpy_version}"]

    del state["steps"]["s"]["fingerprint"]["libraries"]  # a state from before versions
    (tmp_path / "s.json").write_text(json.dumps(state))
    [decision] = _package_dag(tmp_path)[0].status()
    assert decision.reasons == [f"library changed: numpy <none> -> {numpy_version}"]


def test_failure_keeps_earlier_outputs_and_next_run_resumes(toy: Toy) -> None:
    toy.fail = {"b"}
    report = toy.dag().run()
    assert report.failed == ["b"]
    actions = {d.step: d.action for d in report.decisions}
    assert actions == {"a": "run", "b": "run", "c": "blocked", "d": "run"}
    assert (toy.root / "a.txt").exists() and (toy.root / "d.txt").exists()
    assert not (toy.root / "c.txt").exists()
    status = {d.step: d for d in toy.dag().status()}
    assert status["b"].status == "failed" and "b broke" in status["b"].reasons[0]
    assert status["a"].status == "done" and status["c"].status == "missing"

    toy.fail = set()
    toy.calls.clear()
    report = toy.dag().run()
    assert report.ok and toy.calls == ["b", "c"]
    assert {d.step: d.status for d in toy.dag().status()} == dict.fromkeys("abcd", "done")


def test_force_and_until(toy: Toy) -> None:
    report = toy.dag().run(until="b")
    assert toy.calls == ["a", "b"]
    assert {d.step: d.action for d in report.decisions}["c"] == "excluded"
    toy.calls.clear()
    toy.lines.clear()
    toy.dag().run(force=["a"])
    assert toy.calls == ["a", "c", "d"]  # b cached: a rewrote identical content
    assert "forced (--force)" in toy.output()
    with pytest.raises(DagError, match="unknown step"):
        toy.dag().run(force=["nope"])


def test_status_reports_missing_output_and_upstream(toy: Toy) -> None:
    dag = toy.dag()
    assert {d.status for d in dag.status()} == {"missing"}
    dag.run()
    (toy.root / "b.txt").unlink()
    status = {d.step: d for d in toy.dag().status()}
    assert status["b"].status == "stale"
    assert f"output missing: {toy.root / 'b.txt'}" in status["b"].reasons
    assert status["c"].status == "stale" and "upstream b is stale" in status["c"].reasons
    assert status["a"].status == "done" and status["d"].status == "done"


def test_cycle_and_unknown_need_are_rejected(tmp_path: Path) -> None:
    def noop(ctx: StepContext) -> None:
        return None

    with pytest.raises(DagError, match="cycle"):
        Dag([Step("x", noop, needs=("y",)), Step("y", noop, needs=("x",))], tmp_path / "s")
    with pytest.raises(DagError, match="unknown step 'z'"):
        Dag([Step("x", noop, needs=("z",))], tmp_path / "s")


def test_mlflow_parent_run_with_nested_step_runs(toy: Toy, tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.dag.tracking import MlflowTracker

    def dag() -> Dag:
        d = toy.dag()
        d.tracker = MlflowTracker(mlflow_uri, "dag-test")
        return d

    toy.fail = {"c"}
    first = dag().run(dag_params={"epochs": 3})
    toy.fail = set()
    second = dag().run()
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("dag-test")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    by_id = {r.info.run_id: r for r in runs}
    parent1, parent2 = by_id[first.dag_run_id], by_id[second.dag_run_id]
    assert parent1.info.status == "FAILED" and parent2.info.status == "FINISHED"
    assert parent1.data.params["epochs"] == "3"

    def children(parent_id: str) -> dict[str, object]:
        return {
            r.data.tags["dag.step"]: r
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == parent_id
        }

    kids1, kids2 = children(first.dag_run_id), children(second.dag_run_id)
    assert set(kids1) == set(kids2) == {"a", "b", "c", "d"}
    assert kids1["c"].info.status == "FAILED" and "c broke" in kids1["c"].data.tags["dag.error"]
    assert kids1["a"].info.status == "FINISHED" and kids1["a"].data.metrics["value"] == 1
    assert kids1["a"].data.params["factor"] == "2"
    # the second run resumed at c: a, b, d were cached, c ran and finished
    assert {k: r.data.tags["dag.action"] for k, r in kids2.items()} == {
        "a": "skip",
        "b": "skip",
        "c": "run",
        "d": "skip",
    }
    assert kids2["c"].info.status == "FINISHED"
    assert "last run failed" in kids2["c"].data.tags["dag.reason"]


def test_verify_hook_makes_a_step_stale(tmp_path: Path) -> None:
    calls: list[str] = []
    valid = {"ok": True}

    def act(ctx: StepContext) -> None:
        calls.append("x")
        (tmp_path / "x.out").write_text("x")

    def dag() -> Dag:
        step = Step(
            "x",
            act,
            outputs=(tmp_path / "x.out",),
            verify=lambda: None if valid["ok"] else "MLflow run r1 is gone",
        )
        return Dag([step], tmp_path / "state.json", echo=lambda _: None)

    dag().run()
    dag().run()
    assert calls == ["x"]
    valid["ok"] = False
    assert dag().status()[0].reasons == ["MLflow run r1 is gone"]
    dag().run()
    assert calls == ["x", "x"]


def test_concurrent_runs_are_refused(toy: Toy) -> None:
    dag = toy.dag()
    with dag._lock(), pytest.raises(DagError, match="another `dag run`"):
        toy.dag().run()
    assert toy.dag().run().ok  # the lock is released afterwards
