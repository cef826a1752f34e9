"""MLflow lineage for DAG runs: one parent run per ``dag run``, one nested child run per step.

Runs are created through ``MlflowClient`` rather than ``mlflow.start_run`` so no run is
"active" in the fluent API while a step executes: the training code starts its own runs with
the fluent API, and an active DAG run would turn them into errors or accidental children.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.dag.engine import Decision, Fingerprint, Step, StepResult, Tracker
from training.tracking import create_store, end_abandoned_runs, owner_tags

TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
_MAX_PARAM = 500  # MLflow's limit on a param value is 6000 chars; keep the table readable


@dataclass
class MlflowTracker(Tracker):
    tracking_uri: str
    experiment: str
    # Where the steps' own runs go (training): their abandoned runs are ended too.
    also_experiments: tuple[str, ...] = ()
    experiment_id: str | None = None
    dag_run_id: str | None = None

    def start_dag(self, params: Mapping[str, Any]) -> str | None:
        # The store is first touched here, after the request was validated.
        from mlflow.tracking import MlflowClient

        create_store(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = (
            exp.experiment_id if exp is not None else self.client.create_experiment(self.experiment)
        )
        others = [self.client.get_experiment_by_name(e) for e in self.also_experiments]
        end_abandoned_runs(
            self.client, [self.experiment_id, *(e.experiment_id for e in others if e)]
        )
        run = self.client.create_run(
            self.experiment_id,
            tags={TAG_RUN_NAME: "dag", "dag.kind": "dag", "host": platform.node()} | owner_tags(),
        )
        self.dag_run_id = run.info.run_id
        self._log_params(self.dag_run_id, params)
        return self.dag_run_id

    def start_step(self, step: Step, decision: Decision, fp: Fingerprint | None) -> str | None:
        tags = {
            TAG_RUN_NAME: step.name,
            "dag.kind": "step",
            "dag.step": step.name,
            "dag.action": decision.action,
            "dag.reason": "; ".join(decision.reasons)[:5000],
            TAG_PARENT: self.dag_run_id,
            **owner_tags(),
        }
        if fp is not None:
            tags.update({f"dag.hash.{k}": v for k, v in fp.short().items()})
        run = self.client.create_run(self.experiment_id, tags=tags)
        self._log_params(run.info.run_id, step.params)
        return run.info.run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(
            run_id, params=[Param(k, str(v)[:_MAX_PARAM]) for k, v in params.items()]
        )

    def end_step(
        self, run_id: str | None, ok: bool, result: StepResult | None, error: str | None
    ) -> None:
        if result is not None:
            from mlflow.entities import Metric, RunTag

            now = int(time.time() * 1000)
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), now, 0) for k, v in result.metrics.items()],
                tags=[RunTag(k, str(v)[:5000]) for k, v in result.tags.items()],
            )
        if error:
            self.client.set_tag(run_id, "dag.error", error[-5000:])
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")

    def end_dag(self, run_id: str | None, ok: bool, summary: Mapping[str, Any]) -> None:
        for step, action in summary.items():
            self.client.set_tag(run_id, f"dag.step.{step}", str(action))
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
