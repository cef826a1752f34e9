"""Training throughput and 5-step rollout latency: CfC against GRU, in the same run.

The same batches for every model, repeats interleaved (the model order rotates each repeat)
and medians reported, because the machine is shared. Models are the training code's own
(``training.models.build_model``: recurrent layers, linear head, residual output, level
memory), one network each, at the paper's 2 x 128 (CfC backbone 128) unless ``--layers`` /
``--units`` say otherwise.

    .venv/bin/python bench/train_speed.py                  # torch's default threads
    .venv/bin/python bench/train_speed.py --threads 1 --models gru cfc cfc-ncps

Figures (per model; "x GRU" > 1 means faster than GRU):
  teacher-forced ex/s  full optimisation steps (forward over batch x seq-len x 39, MSE,
                       backward, grad-norm clip 1.0, Adam) per second, times the batch size;
  closed-loop ex/s     the same with a K-step closed-loop loss: the first seq-len - K bins
                       encoded with ``model.step`` (autograd on), then K steps fed back from
                       the model's own predictions (observed mask 0, true interventions),
                       MSE on the K predictions;
  cpu ms/step          median process CPU time per teacher-forced step (less sensitive to
                       other tenants);
  rollout ms           one 5-step rollout (the history, then 4 fed-back steps:
                       ``training.rollout.forecast_rollout``), float64 as the Forecaster runs
                       it, for 1 patient.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path
from statistics import median

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import interleaved  # noqa: E402
from features.catalog import N_STATE  # noqa: E402
from training.models import ModelConfig, build_model  # noqa: E402
from training.models.base import N_INPUT  # noqa: E402
from training.rollout import continue_rollout, encode, forecast_rollout  # noqa: E402

MODELS = {"gru": ("gru", "torch"), "cfc": ("cfc", "torch"), "cfc-ncps": ("cfc", "ncps")}
# Stays per batch, bins per training sequence, closed-loop steps, history bins of a rollout.
BATCH, SEQ_LEN, K, HISTORY = 64, 20, 5, 10


def make_batches(n: int, batch: int, seq_len: int, seed: int = 0) -> list:
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


def closed_loop_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Encode bins 0..T-K-1 step by step, then feed back K-1 predictions; loss on K steps."""
    start = x.shape[1] - K
    ys, states = encode(model, x[:, :start])
    state = [s[:, -1] for s in states]
    preds = continue_rollout(model, ys[:, -1], state, x[:, start:-1, 2 * N_STATE :])
    return nn.functional.mse_loss(preds, y[:, start - 1 : -1])


def bench(args: argparse.Namespace) -> dict:
    batches = make_batches(4, BATCH, SEQ_LEN)
    models, opts = {}, {}
    for name in args.models:
        model, impl = MODELS[name]
        torch.manual_seed(0)
        # Explicit sizes: the training defaults (small ensembles) are not the paper's networks.
        size = {"layers": args.layers, "units": args.units, "backbone_units": args.units}
        cfg = ModelConfig(model=model, cfc_impl=impl, ensemble=1, **size)
        models[name] = build_model(cfg).train()
        opts[name] = torch.optim.Adam(models[name].parameters(), lr=1e-3, fused=True)

    rows: dict[str, dict] = {n: {} for n in args.models}
    teacher_forced = ("tf", lambda model, x, y: nn.functional.mse_loss(model(x), y))
    for label, loss_fn in (teacher_forced, ("cl", closed_loop_loss)):

        def run(name: str, loss_fn: Callable = loss_fn) -> None:
            """``--steps`` optimisation steps: loss, backward, grad-norm clip 1.0, Adam."""
            model, opt = models[name], opts[name]
            for s in range(args.steps):
                opt.zero_grad(set_to_none=True)
                loss_fn(model, *batches[s % len(batches)]).backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()

        for name in args.models:  # warm-up
            run(name)
        wall, cpu = interleaved(args.models, args.repeats, run)
        for name in args.models:
            rows[name][f"{label}_ex_s"] = BATCH * args.steps / median(wall[name])
            rows[name][f"{label}_cpu_ms"] = 1e3 * median(cpu[name]) / args.steps

    infer = {n: copy.deepcopy(m).double().eval() for n, m in models.items()}
    hist = batches[0][0][:1, :HISTORY].double()
    lengths = torch.tensor([hist.shape[1]])
    future = hist[:, -1:, 2 * N_STATE :].expand(-1, 4, -1)
    wall, _ = interleaved(
        args.models, args.repeats, lambda n: forecast_rollout(infer[n], hist, lengths, future)
    )
    for name in args.models:
        rows[name]["roll_ms"] = 1e3 * median(wall[name])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=["gru", "cfc"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--units", type=int, default=128, help="units per layer (CfC backbone too)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="training steps per timed repeat")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    if "gru" not in args.models:
        args.models.insert(0, "gru")
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.layers} x {args.units}, batch {BATCH} x {SEQ_LEN} bins, "
        f"closed loop K={K}, {args.repeats} "
        f"interleaved repeats x {args.steps} steps, medians; load average at start "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    rows = bench(args)
    gru = rows["gru"]
    head = (
        f"{'model':9s} {'teacher-forced ex/s':>19s} {'x GRU':>6s} {'cpu ms/step':>11s} "
        f"{'closed-loop ex/s':>16s} {'x GRU':>6s} {'rollout ms':>10s} {'x GRU':>6s}"
    )
    print(head + "\n" + "-" * len(head))
    for name, r in rows.items():
        print(
            f"{name:9s} {r['tf_ex_s']:19.0f} {r['tf_ex_s'] / gru['tf_ex_s']:6.2f} "
            f"{r['tf_cpu_ms']:11.2f} {r['cl_ex_s']:16.0f} {r['cl_ex_s'] / gru['cl_ex_s']:6.2f} "
            f"{r['roll_ms']:10.2f} {gru['roll_ms'] / r['roll_ms']:6.2f}"
        )
    print(f"load average at end {os.getloadavg()[0]:.2f} (other tenants inflate wall times)")


if __name__ == "__main__":
    main()
