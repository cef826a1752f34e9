"""Training throughput, 5-step rollout latency and peak memory: GRU vs ncps CfC vs FastCfC.

One run, the same batches for every model, repeats interleaved (the model order rotates each
repeat) and medians reported, because the machine is shared. Models are the training code's
own (``training.models.build_model``: recurrent layers, linear head, residual output), at the
paper's 2 x 128 and at a small configuration (default 1 x 32, backbone 32).

    .venv/bin/python bench/train_speed.py                 # torch's default threads, 7 repeats
    .venv/bin/python bench/train_speed.py --threads 1 --profile

Figures:
  train ex/s, steps/s  median wall-clock throughput of full optimisation steps (forward, MSE,
                       backward, grad-norm clip 1.0, the training code's Adam:
                       training.lit.build_optimizer) on batch x seq-len x 39 batches;
  cpu ms/step          median process CPU time per step (less sensitive to other tenants);
  rollout ms           median wall time of one 5-step recursive rollout (the history, then
                       4 fed-back steps: training.rollout.forecast_rollout), float64 as
                       the Forecaster runs it, for 1 patient and per patient in a batch of 64;
  peak MB              training peak-RSS increase over 3 steps in a fresh process (kernel
                       VmHWM after resetting it via /proc/self/clear_refs; Linux only).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.lit import build_optimizer  # noqa: E402
from training.models import ModelConfig, build_model  # noqa: E402
from training.models.base import N_INPUT  # noqa: E402
from training.rollout import forecast_rollout  # noqa: E402

N_STATE = 18
IMPLS = (("gru", "gru", "ncps"), ("cfc-ncps", "cfc", "ncps"), ("cfc-fast", "cfc", "fast"))


def model_config(name: str, units: int, layers: int, backbone_units: int) -> ModelConfig:
    model, impl = {n: (m, i) for n, m, i in IMPLS}[name]
    return ModelConfig(
        model=model, units=units, layers=layers, backbone_units=backbone_units, cfc_impl=impl
    )


def make_batches(n: int, batch: int, seq_len: int, seed: int = 0):
    """Inputs shaped like the model convention: scaled state, observed mask, interventions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        state = torch.rand(batch, seq_len + 1, N_STATE, generator=g)
        observed = (torch.rand(batch, seq_len, N_STATE, generator=g) < 0.6).float()
        iv = torch.rand(batch, seq_len, N_INPUT - 2 * N_STATE, generator=g)
        x = torch.cat([state[:, :-1], observed, iv], dim=-1)
        out.append((x, state[:, 1:]))
    return out


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def rollout(model: nn.Module, x: torch.Tensor, horizon: int) -> torch.Tensor:
    lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
    future = x[:, -1:, 2 * N_STATE :].expand(-1, horizon - 1, -1)
    return forecast_rollout(model, x, lengths, future)


def _vm(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) * 1024


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: peak RSS increase of 3 training steps of one model."""
    torch.set_num_threads(args.threads)
    name, units, layers, bb = args.memory_child
    torch.manual_seed(0)
    model = build_model(model_config(name, int(units), int(layers), int(bb)))
    opt = build_optimizer(model.parameters(), lr=1e-3)
    batches = make_batches(3, args.batch, args.seq_len)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _vm("VmRSS")
    for x, y in batches:
        train_step(model, opt, x, y)
    print(json.dumps({"peak_delta_bytes": _vm("VmHWM") - base}))


def peak_memory_mb(args: argparse.Namespace, name: str, units: int, layers: int, bb: int):
    cmd = [
        sys.executable, __file__, "--memory-child", name, str(units), str(layers), str(bb),
        "--threads", str(args.threads), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_bytes"] / 2**20
    except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as exc:
        print(f"  (peak memory of {name} not measured: {exc})", file=sys.stderr)
        return float("nan")


def bench_config(args, label: str, units: int, layers: int, bb: int, batches) -> dict:
    models, opts = {}, {}
    for name, _, _ in IMPLS:
        torch.manual_seed(0)
        models[name] = build_model(model_config(name, units, layers, bb))
        opts[name] = build_optimizer(models[name].parameters(), lr=1e-3)
        models[name].train()
        for x, y in batches[:2]:  # warm-up
            train_step(models[name], opts[name], x, y)
    wall = {n: [] for n in models}
    cpu = {n: [] for n in models}
    names = list(models)
    for rep in range(args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            for s in range(args.steps):
                x, y = batches[s % len(batches)]
                train_step(models[name], opts[name], x, y)
            wall[name].append((time.perf_counter() - t0) / args.steps)
            cpu[name].append((time.process_time() - c0) / args.steps)

    # Rollouts in float64, eval mode, as the Forecaster runs them.
    infer = {n: copy.deepcopy(m).double().eval() for n, m in models.items()}
    hist = batches[0][0][:, : args.history].double()
    one, many = {n: [] for n in models}, {n: [] for n in models}
    for name in infer:
        rollout(infer[name], hist[:1], args.horizon)
    for rep in range(args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            for _ in range(3):
                t0 = time.perf_counter()
                rollout(infer[name], hist[:1], args.horizon)
                one[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rollout(infer[name], hist, args.horizon)
            many[name].append((time.perf_counter() - t0) / hist.shape[0])

    rows = {}
    for name in names:
        w = statistics.median(wall[name])
        rows[name] = {
            "params": sum(p.numel() for p in models[name].parameters()),
            "ex_s": args.batch / w,
            "steps_s": 1.0 / w,
            "cpu_ms": 1e3 * statistics.median(cpu[name]),
            "roll1_ms": 1e3 * statistics.median(one[name]),
            "roll64_ms": 1e3 * statistics.median(many[name]),
            "peak_mb": float("nan")
            if args.no_memory
            else peak_memory_mb(args, name, units, layers, bb),
        }
    if args.profile:
        profile_fast(models["cfc-fast"], opts["cfc-fast"], batches, label)
    return rows


def profile_fast(model, opt, batches, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y in batches:
            train_step(model, opt, x, y)
    print(f"\nprofile: cfc-fast {label}, {len(batches)} training steps (self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def print_table(label: str, rows: dict) -> None:
    gru = rows["gru"]
    print(f"\n{label}")
    head = (
        f"{'model':10s} {'params':>8s} {'train ex/s':>10s} {'steps/s':>8s} {'x GRU':>6s} "
        f"{'cpu ms/step':>11s} {'rollout ms (B=1)':>16s} {'x GRU':>6s} "
        f"{'per rollout ms (B=64)':>21s} {'peak MB':>8s}"
    )
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        print(
            f"{name:10s} {r['params']:8d} {r['ex_s']:10.0f} {r['steps_s']:8.2f} "
            f"{r['ex_s'] / gru['ex_s']:6.2f} {r['cpu_ms']:11.2f} {r['roll1_ms']:16.2f} "
            f"{gru['roll1_ms'] / r['roll1_ms']:6.2f} {r['roll64_ms']:21.3f} {r['peak_mb']:8.1f}"
        )
    fast, ncps = rows["cfc-fast"], rows["cfc-ncps"]
    print(
        f"fast / ncps: training {fast['ex_s'] / ncps['ex_s']:.2f}x (cpu time "
        f"{ncps['cpu_ms'] / fast['cpu_ms']:.2f}x), "
        f"rollout B=1 {ncps['roll1_ms'] / fast['roll1_ms']:.2f}x"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=20, help="bins per training sequence")
    p.add_argument("--history", type=int, default=10, help="history bins before a rollout")
    p.add_argument("--horizon", type=int, default=5)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="training steps per timed repeat")
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch intra-op threads (default: torch's, as training uses unless --threads)",
    )
    p.add_argument(
        "--small",
        type=int,
        nargs=3,
        default=(32, 1, 32),
        metavar=("UNITS", "LAYERS", "BACKBONE"),
        help="the small configuration",
    )
    p.add_argument("--only", choices=("paper", "small"), help="bench one configuration")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--profile", action="store_true", help="print a torch profile of cfc-fast")
    p.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    torch.set_num_threads(args.threads)
    configs = {"paper": ("2 x 128 (backbone 128)", 128, 2, 128)}
    u, n_layers, bb = args.small
    configs["small"] = (f"small: {n_layers} x {u} (backbone {bb})", u, n_layers, bb)
    if args.only:
        configs = {args.only: configs[args.only]}
    batches = make_batches(4, args.batch, args.seq_len)
    load0 = os.getloadavg()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch} x "
        f"{args.seq_len} bins x {N_INPUT} inputs, {args.repeats} interleaved repeats x "
        f"{args.steps} steps, medians; load average at start {load0[0]:.2f} on "
        f"{os.cpu_count()} CPUs"
    )
    for label, units, layers, bb in configs.values():
        print_table(label, bench_config(args, label, units, layers, bb, batches))
    print(f"\nload average at end {os.getloadavg()[0]:.2f} (other tenants inflate wall times)")


if __name__ == "__main__":
    main()
