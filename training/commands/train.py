"""``icu-forecast train``: train and evaluate one model, log it to MLflow."""

from __future__ import annotations

import argparse

from features.settings import settings_from_flags
from training.models import MODEL_NAMES

# flag -> (type, help). Every flag defaults to None: only given flags override env / defaults.
_FLAGS: dict[str, tuple[type, str]] = {
    "data": (str, "ETL output folder (bins.parquet, preprocessor/); default data/processed"),
    "label": (str, "run label shown by compare (default: the model name), e.g. cfc-small"),
    "seed": (int, "random seed (default 0)"),
    "epochs": (int, "maximum epochs (default 30)"),
    "batch-size": (int, "stays per batch (default 64)"),
    "lr": (float, "Adam learning rate (default 1e-3)"),
    "weight-decay": (float, "Adam weight decay (default 0)"),
    "grad-clip": (float, "gradient norm clip, 0 = off (default 1.0)"),
    "patience": (int, "early-stopping patience in epochs on val loss (default 10)"),
    "units": (int, "units per recurrent layer (default 128)"),
    "layers": (int, "recurrent layers (default 2)"),
    "mode": (str, "CfC mode: default | pure | no_gate"),
    "backbone-units": (int, "CfC backbone units (default 128)"),
    "backbone-layers": (int, "CfC backbone layers (default 1)"),
    "backbone-dropout": (float, "CfC backbone dropout (default 0)"),
    "cfc-impl": (str, "CfC implementation: fast (default; same function as ncps) | ncps"),
    "ncp-output": (int, "cfc-ncp: motor neurons of the AutoNCP wiring (default 18)"),
    "ode-unfolds": (int, "LTC ODE solver unfolds (default 6)"),
    "ridge-alpha": (float, "linear baseline ridge penalty (default 1.0)"),
    "accelerator": (str, "Lightning accelerator: auto | cpu | gpu | ..."),
    "devices": (str, "Lightning devices: auto | N"),
    "strategy": (str, "Lightning strategy: auto | ddp | ddp_spawn | fsdp | ..."),
    "precision": (str, "Lightning precision: 32-true | 16-mixed | bf16-mixed | ..."),
    "num-nodes": (int, "Lightning num_nodes (default 1)"),
    "num-workers": (int, "DataLoader workers (default 0)"),
    "threads": (int, "torch threads per process (default: torch's choice)"),
    "checkpoint-dir": (str, "checkpoint root (default outputs/checkpoints)"),
    "tracking-uri": (
        str,
        "MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    ),
    "experiment": (str, "MLflow experiment (default icu-forecast)"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODEL_NAMES, default=None, help="model (default cfc)")
    for flag, (typ, help_text) in _FLAGS.items():
        parser.add_argument(f"--{flag}", type=typ, default=None, help=help_text)
    bools = {
        "mixed-memory": "CfC / LTC mixed memory (LSTM-style)",
        "residual": "predict the change from the current state (default on)",
        "resume": "resume from the run's last checkpoint if one exists",
        "register": "register the pyfunc as icu-forecast-<model> (default on)",
        "plots": "log plot artifacts (default on)",
    }
    for flag, help_text in bools.items():
        parser.add_argument(
            f"--{flag}", action=argparse.BooleanOptionalAction, default=None, help=help_text
        )
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="rollout lengths")
    parser.add_argument("--sigmas", type=float, nargs="+", default=None, help="noise sigmas")


def settings_from_args(args: argparse.Namespace):  # noqa: ANN201
    from training.config import TrainConfig

    values = dict(vars(args))
    values["register_model"] = values.pop("register", None)
    given = {k: v for k, v in values.items() if k in TrainConfig.model_fields}
    return settings_from_flags(TrainConfig, given, "train")


def run(args: argparse.Namespace) -> int:
    from training.train import train_model

    cfg = settings_from_args(args)
    result = train_model(cfg)
    if result.run_id is None:  # a non-zero DDP rank: rank 0 reports
        return 0
    m = result.metrics
    ks = [k for k in cfg.ks]
    print(
        f"run {result.run_id}  model {result.model}  label {result.label}  "
        f"registered version {result.registered_version}"
    )
    print(
        "test RMSE (scaled): "
        + "  ".join(f"K={k}: {m.get(f'test/rmse_k{k}', float('nan')):.4f}" for k in ks)
    )
    print(
        f"params {int(m.get('n_params', 0))}  peak mem {m.get('peak_mem_mb', float('nan')):.0f} MB"
    )
    return 0
