"""Prometheus metrics of one app instance (own registry, so several apps can live in a test)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[str, str, int], tuple] = {}
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
        )
        self.reloads = Counter(
            "icu_forecast_model_reloads", "model (re)loads by result", ["result"], registry=r
        )
        self.model_loaded = Gauge(
            "icu_forecast_model_loaded", "1 when a model is serving", registry=r
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        # Label lookups cost more than the increments; the label sets are few, so cache them.
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(method, route, str(status)),
                self.latency.labels(route),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def count_warnings(self, kinds: dict[str, int]) -> None:
        for kind, n in kinds.items():
            self.input_warnings.labels(kind).inc(n)

    def set_model(self, name: str, version: str | None, run_id: str | None) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version or "", run_id or "").set(1)
        self.model_loaded.set(1)
