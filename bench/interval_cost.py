"""What prediction intervals cost the service: the same model, intervals off vs on, in process.

One app (TestClient, lifespan run, no network), the same made-up patients; each request is
sent with ``"interval_levels": []`` (off) and without it (the model's default levels),
interleaved, and the median and minimum times per request are printed, and the median CPU
time of the process (app and client together: steadier than wall time when other jobs share
the cores, and close to it on an idle machine, where torch runs one thread). The HTTP benchmark
(bench/serve_load.py) is too noisy on a shared machine to see a 10% change. Then where the
batch's extra time goes: the loaded Forecaster's model call and its interval computation on
the same patients, timed alone, and the response sizes.

    .venv/bin/python bench/interval_cost.py --tracking-uri sqlite:///mlflow.db \\
        --model-uri models:/icu-forecast-cfc@champion

Figures are printed, never asserted: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from bench.serve_load import patient  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--model-uri", required=True)
    ap.add_argument("--bins", type=int, default=8)
    ap.add_argument("--horizon", type=int, default=5)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=25, help="batch requests per arm")
    args = ap.parse_args(argv)

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import ServiceSettings

    settings = ServiceSettings(mlflow_tracking_uri=args.tracking_uri, model_uri=args.model_uri)
    cases = (
        ("one forecast", "/v1/forecast", 1, 8 * args.repeats),
        (f"batch of {args.batch}", "/v1/forecast/batch", args.batch, args.repeats),
    )
    with TestClient(create_app(settings)) as client:
        for name, path, n, repeats in cases:
            bodies = {}
            for arm, extra in (("off", {"interval_levels": []}), ("on", {})):
                ps = [patient(i, args.bins, args.horizon) | extra for i in range(n)]
                bodies[arm] = json.dumps(ps[0] if n == 1 else {"patients": ps}).encode()
            times: dict[str, list[float]] = {"off": [], "on": []}
            cpu: dict[str, list[float]] = {"off": [], "on": []}
            payload: dict[str, bytes] = {}
            for _ in range(repeats):
                for arm in ("off", "on"):
                    t0, c0 = time.perf_counter(), time.process_time()
                    r = client.post(
                        path, content=bodies[arm], headers={"content-type": "application/json"}
                    )
                    times[arm].append(time.perf_counter() - t0)
                    cpu[arm].append(time.process_time() - c0)
                    r.raise_for_status()
                    payload[arm] = r.content
            encode = {a: encode_times(json.loads(p), repeats) for a, p in payload.items()}
            print(
                f"{name}: median {change(times, statistics.median)}, min {change(times, min)}, "
                f"CPU median {change(cpu, statistics.median)}; response "
                f"{len(payload['off']):,} -> {len(payload['on']):,} bytes, encoding it alone "
                f"(orjson) {change(encode, statistics.median)}",
                flush=True,
            )
        forecaster = client.app.state.holder.current.forecaster
        parts = model_parts(forecaster, args.batch, args.bins, args.horizon, args.repeats)
        print(
            f"batch of {args.batch}, in process: model call {parts['forecast']:.2f} ms, "
            f"intervals {parts['intervals']:.3f} ms (median)",
            flush=True,
        )
    return 0


def change(samples: dict[str, list[float]], stat: Callable) -> str:
    """``stat`` of the "off" and "on" samples (ms) and the relative change."""
    off, on = stat(samples["off"]) * 1e3, stat(samples["on"]) * 1e3
    return f"{off:.2f} -> {on:.2f} ms ({100 * (on / off - 1):+.0f}%)"


def encode_times(payload: object, repeats: int) -> list[float]:
    """Seconds of each ``orjson.dumps`` of a response's objects (what the app writes)."""
    import orjson

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        orjson.dumps(payload)
        times.append(time.perf_counter() - t0)
    return times


def model_parts(forecaster, n: int, bins: int, horizon: int, repeats: int) -> dict[str, float]:  # noqa: ANN001
    """Median ms of ``Forecaster.forecast`` and of ``Forecaster.intervals`` (default levels)
    for the bench's ``n`` patients, padded as the service pads them."""
    import torch

    from service.model import pad_batch
    from service.requests import patient_input
    from service.schemas import request_models
    from service.settings import ServiceSettings

    request, _ = request_models(ServiceSettings())
    patients = [patient_input(request.model_validate(patient(i, bins, horizon))) for i in range(n)]
    state, iv, lengths, planned = pad_batch(patients)
    times: dict[str, list[float]] = {"forecast": [], "intervals": []}
    with torch.inference_mode():
        out = forecaster.forecast(state, iv, lengths, planned)
        for _ in range(repeats):
            t0 = time.perf_counter()
            forecaster.forecast(state, iv, lengths, planned)
            t1 = time.perf_counter()
            forecaster.intervals(out, state, lengths)
            t2 = time.perf_counter()
            times["forecast"].append(t1 - t0)
            times["intervals"].append(t2 - t1)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


if __name__ == "__main__":
    raise SystemExit(main())
