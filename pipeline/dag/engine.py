"""A small cached DAG: steps run in dependency order and are skipped when nothing changed.

A step declares its inputs (files or folders, hashed by content), its parameters, the code it
runs (modules: their files, the project files they import and the versions of the
result-shaping libraries they import are hashed) and its outputs. After a successful run its
fingerprint is written to the state file; the next run skips the step when the fingerprint is
the same and its outputs still exist, and otherwise says which input, parameter, code file or
library changed. A failed step is recorded as failed, steps that need it are
blocked, independent steps still run, and the next run resumes from the failed step because
everything before it is cached.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from features.atomic import atomic_write_text
from features.errors import UserError
from pipeline.dag.hashing import (
    code_digests,
    combined,
    inputs_digests,
    params_canonical,
)

STATE_FORMAT = 1
Status = Literal["done", "stale", "missing", "failed"]
Action = Literal["run", "skip", "blocked", "not-needed", "excluded"]
UNRECORDED = "<none>"  # a library a fingerprint does not list (not imported, or not recorded)


class DagError(UserError):
    """A malformed DAG definition or a request naming an unknown step."""


@dataclass
class StepResult:
    """What a step reports: metrics for its MLflow child run and a summary for the state."""

    metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    message: str = ""


@dataclass
class StepContext:
    parent_run_id: str | None
    child_run_id: str | None
    echo: Callable[[str], None]


@dataclass(frozen=True)
class Step:
    name: str
    action: Callable[[StepContext], StepResult | None]
    needs: tuple[str, ...] = ()
    inputs: tuple[Path, ...] = ()
    outputs: tuple[Path, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    code: tuple[str, ...] = ()
    # Returns why the step has nothing to do this time (e.g. fetch with data present), or None.
    not_needed: Callable[[], str | None] | None = None
    # Returns why recorded outputs are no longer valid (e.g. a run gone from MLflow), or None.
    verify: Callable[[], str | None] | None = None


@dataclass
class Decision:
    step: str
    status: Status
    reasons: list[str]
    action: Action = "skip"


@dataclass
class Fingerprint:
    inputs: dict[str, str]
    params: dict[str, Any]
    code: dict[str, str]  # source file (path from the project root) -> sha256
    libraries: dict[str, str] = field(default_factory=dict)  # distribution -> version

    def short(self) -> dict[str, str]:
        return {part: combined(digests) for part, digests in asdict(self).items()}


def _listing(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def diff_fingerprints(old: Mapping[str, Any], new: Fingerprint) -> list[str]:
    """Human-readable reasons why ``new`` differs from the recorded ``old`` fingerprint."""
    reasons: list[str] = []
    if changed := _changed(old.get("inputs", {}), new.inputs):
        reasons.append(f"input changed: {_listing(changed)}")
    old_params: dict[str, Any] = old.get("params", {})
    for key in _changed(old_params, new.params):
        reasons.append(
            f"param changed: {key} {old_params.get(key, '<unset>')!r} -> "
            f"{new.params.get(key, '<unset>')!r}"
        )
    if changed := _changed(old.get("code", {}), new.code):
        reasons.append(f"code changed: {_listing(changed)}")
    # A state written before versions were recorded lacks the section: that is a change too.
    old_libs: dict[str, str] = old.get("libraries", {})
    if changed := _changed(old_libs, new.libraries):
        listed = [
            f"{name} {old_libs.get(name, UNRECORDED)} -> {new.libraries.get(name, UNRECORDED)}"
            for name in changed
        ]
        reasons.append(f"library changed: {_listing(listed)}")
    return reasons


class StateStore:
    """The JSON state file: each step's last successful run and its last failure."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        data: dict[str, Any] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise DagError(
                    f"DAG state file {self.path} is not valid JSON ({exc}); delete it to "
                    "re-run every step"
                ) from exc
            if data.get("format") != STATE_FORMAT:
                data = {}
        self.steps: dict[str, dict[str, Any]] = data.get("steps", {})
        self.failures: dict[str, dict[str, Any]] = data.get("failures", {})
        self.cache: dict[str, list] = data.get("digest_cache", {})

    def save(self) -> None:
        payload = {
            "format": STATE_FORMAT,
            "steps": self.steps,
            "failures": self.failures,
            "digest_cache": self.cache,
        }
        atomic_write_text(self.path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


class Tracker:
    """Where runs are recorded: nowhere (ids None) here, MLflow in ``MlflowTracker``."""

    def start_dag(self, params: Mapping[str, Any]) -> str | None:
        return None

    def start_step(self, step: Step, decision: Decision, fp: Fingerprint | None) -> str | None:
        return None

    def end_step(
        self, run_id: str | None, ok: bool, result: StepResult | None, error: str | None
    ) -> None:
        return None

    def end_dag(self, run_id: str | None, ok: bool, summary: Mapping[str, Any]) -> None:
        return None


@dataclass
class RunReport:
    decisions: list[Decision]
    dag_run_id: str | None

    @property
    def failed(self) -> list[str]:
        return [d.step for d in self.decisions if d.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Dag:
    def __init__(
        self,
        steps: Iterable[Step],
        state_path: Path,
        tracker: Tracker | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.steps: dict[str, Step] = {}
        for step in steps:
            if step.name in self.steps:
                raise DagError(f"duplicate step name {step.name!r}")
            self.steps[step.name] = step
        self.order = self._topological()
        self.state_path = Path(state_path)
        self.tracker = tracker or Tracker()
        self.echo = echo

    def _topological(self) -> list[str]:
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str, needed_by: str = "") -> None:
            if name not in self.steps:
                raise DagError(f"step {needed_by!r} needs unknown step {name!r}")
            if name in order:
                return
            if name in visiting:
                raise DagError(f"dependency cycle through step {name!r}")
            visiting.add(name)
            for need in self.steps[name].needs:
                visit(need, name)
            visiting.discard(name)
            order.append(name)

        for name in self.steps:  # declaration order breaks ties
            visit(name)
        return order

    def check_names(self, names: Iterable[str], flag: str) -> None:
        unknown = [n for n in names if n not in self.steps]
        if unknown:
            raise DagError(
                f"{flag}: unknown step(s) {', '.join(unknown)}; steps are: {', '.join(self.order)}"
            )

    def upstream(self, name: str) -> set[str]:
        """``name`` and every step it depends on, transitively."""
        return {name}.union(*(self.upstream(need) for need in self.steps[name].needs))

    def fingerprint(self, step: Step, cache: dict[str, list]) -> Fingerprint:
        files, libraries = code_digests(step.code)
        return Fingerprint(
            inputs_digests(step.inputs, cache), params_canonical(step.params), files, libraries
        )

    def _decide(
        self, step: Step, store: StateStore, fp: Fingerprint, upstream_status: dict[str, Status]
    ) -> Decision:
        record = store.steps.get(step.name)
        failure = store.failures.get(step.name)
        reasons = [f"last run failed at {failure['at']}: {failure['error']}"] if failure else []
        if record is None:
            reasons = reasons or ["never ran successfully"]
            return Decision(step.name, "failed" if failure else "missing", reasons, "run")
        reasons += [
            f"upstream {need} is {upstream_status[need]}"
            for need in step.needs
            if upstream_status.get(need, "done") != "done"
        ]
        reasons += [f"output missing: {out}" for out in step.outputs if not Path(out).exists()]
        if not reasons and step.verify is not None and (invalid := step.verify()):
            reasons.append(invalid)
        reasons += diff_fingerprints(record["fingerprint"], fp)
        if reasons:
            return Decision(step.name, "failed" if failure else "stale", reasons, "run")
        return Decision(step.name, "done", [f"unchanged since {record['finished_at']}"], "skip")

    @staticmethod
    def _not_needed(step: Step) -> Decision | None:
        if step.not_needed and (why_not := step.not_needed()):
            return Decision(step.name, "done", [f"not needed: {why_not}"], "not-needed")
        return None

    def status(self) -> list[Decision]:
        """Each step as done / stale / missing / failed, and why, without running anything."""
        store = StateStore(self.state_path)
        decisions: list[Decision] = []
        statuses: dict[str, Status] = {}
        for name in self.order:
            step = self.steps[name]
            decision = self._not_needed(step) or self._decide(
                step, store, self.fingerprint(step, store.cache), statuses
            )
            statuses[name] = decision.status
            decisions.append(decision)
        return decisions

    def run(
        self,
        force: Iterable[str] = (),
        until: str | None = None,
        dag_params: Mapping[str, Any] | None = None,
    ) -> RunReport:
        force = set(force)
        self.check_names(force, "--force")
        selected = set(self.order)
        if until is not None:
            self.check_names([until], "--until")
            selected = self.upstream(until)
        with self._lock():
            store = StateStore(self.state_path)
            dag_run_id = self.tracker.start_dag(
                {**(dag_params or {}), "until": until or "", "force": ",".join(sorted(force))}
            )
            decisions: list[Decision] = []
            statuses: dict[str, Status] = {}
            try:
                for name in self.order:
                    if name not in selected:
                        decisions.append(Decision(name, "missing", ["after --until"], "excluded"))
                        continue
                    decision = self._run_one(self.steps[name], store, statuses, force, dag_run_id)
                    decisions.append(decision)
                    failing = decision.status == "failed" or decision.action == "blocked"
                    statuses[name] = "failed" if failing else "done"
            finally:
                store.save()
                ok = "failed" not in statuses.values()  # a failed or a blocked step
                self.tracker.end_dag(dag_run_id, ok, {d.step: d.action for d in decisions})
            return RunReport(decisions, dag_run_id)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One ``dag run`` at a time per state file: two would race on outputs and state."""
        lock_path = self.state_path.with_name(self.state_path.name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with lock_path.open("w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DagError(
                    f"another `dag run` is using {self.state_path} (lock {lock_path})"
                ) from None
            yield

    def _line(self, name: str, label: str, text: str) -> None:
        width = max(len(n) for n in self.steps)
        self.echo(f"[dag] {name:<{width}}  {label:<7} {text}")

    def _skipped(self, step: Step, decision: Decision, fp: Fingerprint | None) -> Decision:
        self._line(step.name, "SKIP", decision.reasons[0])
        self.tracker.end_step(self.tracker.start_step(step, decision, fp), True, None, None)
        return decision

    def _run_one(
        self,
        step: Step,
        store: StateStore,
        statuses: dict[str, Status],
        force: set[str],
        dag_run_id: str | None,
    ) -> Decision:
        blocked_by = [n for n in step.needs if statuses.get(n) != "done"]
        if blocked_by:
            decision = Decision(
                step.name, "stale", [f"blocked: {', '.join(blocked_by)} failed"], "blocked"
            )
            self._line(step.name, "BLOCKED", decision.reasons[0])
            return decision
        if step.name not in force and (decision := self._not_needed(step)):
            return self._skipped(step, decision, None)
        fp = self.fingerprint(step, store.cache)
        decision = self._decide(step, store, fp, statuses)
        if step.name in force:
            decision.action = "run"
            decision.reasons = [
                "forced (--force)",
                *[r for r in decision.reasons if "unchanged" not in r],
            ]
        if decision.action == "skip":
            return self._skipped(step, decision, fp)
        self._line(step.name, "RUN", "; ".join(decision.reasons))
        run_id = self.tracker.start_step(step, decision, fp)
        ctx = StepContext(dag_run_id, run_id, self.echo)
        started = time.perf_counter()
        try:
            result = step.action(ctx) or StepResult()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            store.failures[step.name] = {"at": _now(), "error": error, "mlflow_run_id": run_id}
            store.save()
            self.tracker.end_step(run_id, False, None, traceback.format_exc())
            self._line(step.name, "FAILED", error)
            decision.status = "failed"
            return decision
        elapsed = time.perf_counter() - started
        result.metrics.setdefault("duration_s", round(elapsed, 3))
        # Inputs are hashed again after the run: a step must not record a fingerprint of
        # inputs that changed while it ran (it would then be skipped with stale outputs).
        if inputs_digests(step.inputs, store.cache) != fp.inputs:
            self.echo(f"[dag] warning: inputs of {step.name} changed while it ran")
        store.steps[step.name] = {
            "fingerprint": asdict(fp),
            "finished_at": _now(),
            "duration_s": round(elapsed, 3),
            "mlflow_run_id": run_id,
            "dag_run_id": dag_run_id,
            "summary": result.summary,
        }
        store.failures.pop(step.name, None)
        store.save()
        self.tracker.end_step(run_id, True, result, None)
        message = f": {result.message}" if result.message else ""
        self._line(step.name, "DONE", f"in {elapsed:.1f}s{message}")
        decision.status = "done"
        return decision
