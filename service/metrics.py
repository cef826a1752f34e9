"""Prometheus metrics of one app instance (own registry, so several apps can live in a test).

Under ``serve --workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set before the workers start:
prometheus-client's multiprocess mode) the values live in files shared by the workers and
``/metrics`` from any worker aggregates all of them.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._model_labels: tuple[str, str, str] | None = None
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "icu_forecast_requests",
            "HTTP requests by route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "icu_forecast_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.forecasts = Counter(
            "icu_forecast_patient_forecasts", "patients forecast (single and batch)", registry=r
        )
        self.model_batch = Histogram(
            "icu_forecast_model_batch_patients",
            "patients per model call (micro-batching gathers concurrent requests)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
            registry=r,
        )
        self.input_warnings = Counter(
            "icu_forecast_input_warnings", "warnings returned, by kind", ["kind"], registry=r
        )
        self.model_info = Gauge(
            "icu_forecast_model_info",
            "the model being served (value 1)",
            ["name", "version", "run_id"],
            registry=r,
            # One series per worker (pid label): during a reload workers may differ.
            multiprocess_mode="liveall",
        )
        self.reloads = Counter(
            "icu_forecast_model_reloads", "model (re)loads by result", ["result"], registry=r
        )
        self.model_loaded = Gauge(
            "icu_forecast_model_loaded",
            "1 when a model is serving (in every worker)",
            registry=r,
            multiprocess_mode="livemin",
        )

    def set_model(self, name: str, version: str | None, run_id: str | None) -> None:
        labels = (name, version or "", run_id or "")
        if self.multiprocess and self._model_labels not in (None, labels):
            # clear() only forgets the series in memory; the shared file would keep saying 1.
            self.model_info.labels(*self._model_labels).set(0)
        elif not self.multiprocess:
            self.model_info.clear()
        self._model_labels = labels
        self.model_info.labels(*labels).set(1)
        self.model_loaded.set(1)

    def process_exiting(self) -> None:
        """Drop this worker's live gauges from the shared files (its counters stay counted)."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())

    def exposition(self) -> bytes:
        """The text format: this app's registry, or all workers' files in multiprocess mode."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
