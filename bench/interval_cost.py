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
import timeit
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from bench.serve_load import patient  # noqa: E402
from bench.timing import interleaved  # noqa: E402

JSON = {"content-type": "application/json"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--model-uri", required=True)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=25, help="batch requests per arm")
    args = ap.parse_args(argv)

    import orjson
    import torch
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.model import pad_batch
    from service.requests import patient_input
    from service.schemas import request_models
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
                ps = [patient(i) | extra for i in range(n)]
                bodies[arm] = json.dumps(ps[0] if n == 1 else {"patients": ps}).encode()
            payload: dict[str, bytes] = {}

            def send(arm: str, path: str = path, bodies: dict = bodies, payload: dict = payload):
                r = client.post(path, content=bodies[arm], headers=JSON)
                payload[arm] = r.raise_for_status().content

            times, cpu = interleaved(["off", "on"], repeats, send)
            # orjson.dumps of the response's objects alone: what the app's encoding costs.
            encode = {
                arm: timeit.repeat(partial(orjson.dumps, json.loads(p)), number=1, repeat=repeats)
                for arm, p in payload.items()
            }
            print(
                f"{name}: median {change(times, statistics.median)}, min {change(times, min)}, "
                f"CPU median {change(cpu, statistics.median)}; response "
                f"{len(payload['off']):,} -> {len(payload['on']):,} bytes, encoding it alone "
                f"(orjson) {change(encode, statistics.median)}",
                flush=True,
            )
        # The model call and its intervals (default levels) alone, on the batch padded as the
        # service pads it.
        forecaster = client.app.state.holder.current.forecaster
        request, _ = request_models(settings)
        batch = [patient_input(request.model_validate(patient(i))) for i in range(args.batch)]
        state, iv, lengths, planned = pad_batch(batch)
        with torch.inference_mode():
            out = forecaster.forecast(state, iv, lengths, planned)
            parts = {
                "forecast": lambda: forecaster.forecast(state, iv, lengths, planned),
                "intervals": lambda: forecaster.intervals(out, state, lengths),
            }
            wall, _ = interleaved(list(parts), args.repeats, lambda part: parts[part]())
        print(
            f"batch of {args.batch}, in process: model call "
            f"{statistics.median(wall['forecast']) * 1e3:.2f} ms, intervals "
            f"{statistics.median(wall['intervals']) * 1e3:.3f} ms (median)",
            flush=True,
        )
    return 0


def change(samples: dict[str, list[float]], stat: Callable) -> str:
    """``stat`` of the "off" and "on" samples (ms) and the relative change."""
    off, on = stat(samples["off"]) * 1e3, stat(samples["on"]) * 1e3
    return f"{off:.2f} -> {on:.2f} ms ({100 * (on / off - 1):+.0f}%)"


if __name__ == "__main__":
    raise SystemExit(main())
