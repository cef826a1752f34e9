"""Load benchmark: the forecast service vs `mlflow models serve` on the same registered model.

Starts both servers on loopback, checks that they return the same forecast, then drives each
with the same single-patient K-step forecast at each concurrency (closed loop, bounded in
requests and seconds), and finally measures patient forecasts per second through the batch
endpoint (and, for reference, through mlflow with the same patients in one DataFrame).

    .venv/bin/python bench/serve_load.py                      # trains a throwaway model first
    .venv/bin/python bench/serve_load.py --tracking-uri sqlite:///mlflow.db \\
        --model-uri models:/icu-forecast-cfc@champion        # a model you already have

Figures are printed, never asserted: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench.loadgen import LoadResult, build_request, run_load  # noqa: E402
from features.catalog import INTERVENTION_NAMES, STATE_NAMES  # noqa: E402
from tests.service_support import train_tiny_model  # noqa: E402

HOST = "127.0.0.1"  # loopback only
BINS, HORIZON = 8, 5  # one forecast: history bins and steps ahead


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def patient(seed: int) -> dict:
    """A plausible made-up patient (no patient data): vitals every bin, labs now and then."""
    rng = np.random.default_rng(seed)
    centre = [85, 120, 60, 80, 18, 37, 96, 12, 130, 1.2, 25, 10, 10.5, 220, 139, 4.1, 24, 1.8]
    history = [
        {
            "bin_start": f"2024-01-{1 + b // 2:02d}T{12 * (b % 2):02d}:00:00Z",
            "values": {
                n: round(float(c * (1 + rng.normal(0, 0.05))), 3)
                for i, (n, c) in enumerate(zip(STATE_NAMES, centre, strict=True))
                if i < 8 or rng.random() < 0.5
            },
            "interventions": {"vasopressor": 0.25, "mechanical_ventilation": 1.0},
        }
        for b in range(BINS)
    ]
    plan = [{"vasopressor": 0.0, "mechanical_ventilation": 1.0, "iv_fluid_ml": 500.0}] * HORIZON
    return {"horizon": HORIZON, "history": history, "planned_interventions": plan}


def mlflow_frame_json(patients: list[dict]) -> dict:
    """The same patients in the pyfunc's long input format (training/pyfunc.py)."""
    columns = ["patient_id", "kind", "step", *STATE_NAMES, *INTERVENTION_NAMES]
    rows = [
        [str(i), kind, step] + [values.get(n) for n in columns[3:]]
        for i, p in enumerate(patients)
        for kind, bins in (
            ("history", [hb["values"] | hb["interventions"] for hb in p["history"]]),
            ("plan", p["planned_interventions"]),
        )
        for step, values in enumerate(bins)
    ]
    return {"dataframe_split": {"columns": columns, "data": rows}}


@contextlib.contextmanager
def server(cmd: list[str], env: dict, ready_url: str, log: Path) -> Iterator:
    with open(log, "wb") as out:
        # A session of its own: `mlflow models serve` runs uvicorn as a child process, and the
        # whole group must stop at the end.
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        # Several workers load their models independently, and each fresh connection may
        # reach any of them: ready means ready on a run of fresh connections.
        ok = 0
        while ok < 10:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited early; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd} not ready after 300 s; see {log}")
            try:
                ok = ok + 1 if httpx.get(ready_url, timeout=2).status_code == 200 else 0
            except httpx.HTTPError:
                ok = 0
            time.sleep(0.05 if ok else 0.5)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tracking-uri")
    ap.add_argument("--model-uri")
    ap.add_argument("--units", type=int, default=128, help="CfC units of the throwaway model")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=3000, help="max requests per level")
    ap.add_argument("--seconds", type=float, default=10.0, help="max seconds per level")
    ap.add_argument("--batch", type=int, default=1000, help="patients per batch request")
    ap.add_argument("--batch-seconds", type=float, default=10.0)
    ap.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes of each server (both get the same)",
    )
    ap.add_argument("--no-mlflow", action="store_true", help="skip `mlflow models serve`")
    ap.add_argument("--work", type=Path, help="folder for the throwaway model and logs")
    args = ap.parse_args(argv)

    # 4 batch requests in flight per worker: each has one waiting while the client sends or
    # reads another.
    batch_c = 4 * args.workers
    work = args.work or Path(tempfile.mkdtemp(prefix="icu-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model_uri:
        uri, model_uri = args.tracking_uri or "sqlite:///mlflow.db", args.model_uri
    else:
        print(f"training a throwaway CfC ({args.units} units) in {work} ...", flush=True)
        served = train_tiny_model(work, args.units)
        uri, model_uri = served.tracking_uri, served.settings_kwargs["model_uri"]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_REGISTRY_URI": uri,
        "MODEL_URI": model_uri,
        # `mlflow models serve` starts `uvicorn` from PATH: use this environment's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    one = patient(0)
    batch = [patient(i) for i in range(args.batch)]
    print(
        f"model {model_uri}; {os.cpu_count()} CPUs here; {args.workers} worker(s) per server"
        f"; one forecast = {BINS} history bins, K={HORIZON}",
        flush=True,
    )
    # (name, command, its port flag, readiness path, single and batch paths and bodies)
    workers = f"--workers {args.workers}"
    servers = [
        (
            "icu-forecast serve",
            f"-m pipeline.cli serve --host {HOST} {workers} --port",
            "/readyz",
            ("/v1/forecast", "/v1/forecast/batch"),
            (one, {"patients": batch}),
        )
    ]
    if not args.no_mlflow:
        servers.append(
            (
                "mlflow models serve",
                f"-m mlflow models serve -m {model_uri} --env-manager local -h {HOST} {workers} -p",
                "/ping",
                ("/invocations", "/invocations"),
                (mlflow_frame_json([one]), mlflow_frame_json(batch)),
            )
        )
    results: dict[str, list[LoadResult]] = {}
    forecasts = []
    for name, args_but_port, ready, paths, bodies in servers:
        port = free_port()
        url = f"http://{HOST}:{port}"
        cmd = [sys.executable, *args_but_port.split(), str(port)]
        with server(cmd, env, url + ready, work / f"{name.split()[0]}.log"):
            answer = httpx.post(url + paths[0], json=bodies[0], timeout=60).json()
            rows = answer.get("predictions") or [s["values"] for s in answer["forecast"]]
            forecasts.append(np.array([[row[n] for n in STATE_NAMES] for row in rows]))
            single, many = (
                build_request(HOST, port, path, json.dumps(body).encode())
                for path, body in zip(paths, bodies, strict=True)
            )
            results[name] = []
            for c in args.levels:
                r = uvloop.run(run_load(HOST, port, single, c, args.requests, args.seconds))
                results[name].append(r)
                err = f"  errors={r.errors} ({r.first_error})" if r.errors else ""
                print(
                    f"{name:<22} c={c:<3} {r.rps:9.1f} req/s   p50 {r.pct_ms(50):8.2f} ms   "
                    f"p99 {r.pct_ms(99):8.2f} ms   n={r.requests}{err}",
                    flush=True,
                )
            res = uvloop.run(
                run_load(HOST, port, many, batch_c, 10**6, args.batch_seconds, warmup=1)
            )
            print(
                f"{name}, batch: {args.batch} patients/request, {batch_c} in flight, "
                f"{res.requests} requests, {res.requests * args.batch / res.seconds:.0f} patient "
                f"forecasts/s, p50 {res.pct_ms(50):.1f} ms/request",
                flush=True,
            )
    if len(forecasts) == 2:
        diff = np.abs(forecasts[0] - forecasts[1]).max()
        print(f"same forecast from both servers: max |diff| = {diff:.2e}")
        print("\nthroughput ratio (icu-forecast / mlflow):")
        for ours, theirs in zip(*results.values(), strict=True):
            ratio = ours.rps / theirs.rps if theirs.rps else float("inf")
            print(f"  c={ours.concurrency:<3} {ratio:6.1f}x")
    print(f"logs in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
