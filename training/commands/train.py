"""``icu-forecast train``: train and evaluate one model, log it to MLflow."""

from __future__ import annotations

import argparse
import sys

from features.settings import settings_from_flags
from training.models import MODEL_NAMES

# flag -> (type, help). Every flag defaults to None: only given flags override env / defaults.
_FLAGS: dict[str, tuple[type, str]] = {
    "data": (str, "ETL output folder (bins.parquet, data_card.json); default data/processed"),
    "preset": (str, "default (closed-loop K-step training) | paper (Zong et al.'s recipe)"),
    "label": (str, "run label shown by compare (default: the model name), e.g. cfc-small"),
    "seed": (int, "random seed (default 0)"),
    "folds": (int, "train on one fold of a patient-grouped CV with this many folds"),
    "fold": (int, "which fold is held out (0-based; with --folds)"),
    "cv-seed": (int, "seed of the fold assignment (with --folds; default 0)"),
    "cv-pool": (str, "all (default) | development: folds over the ETL's train+val patients"),
    "objective": (str, "closed_loop (default) | teacher_forced (the paper's)"),
    "rollout-k": (int, "closed-loop training: rollout steps per start bin (default 5)"),
    "monitor": (str, "early stopping / checkpoint metric: val_rollout_mse | val_loss"),
    "epochs": (int, "maximum epochs (default 150; paper 30)"),
    "batch-size": (int, "stays per batch (default 16; paper 64)"),
    "lr": (float, "AdamW learning rate (default 1e-3)"),
    "weight-decay": (float, "AdamW decoupled weight decay (default 1e-4; paper 0)"),
    "grad-clip": (float, "gradient norm clip, 0 = off (default 1.0)"),
    "patience": (int, "early-stopping patience in epochs (default 20; paper 10)"),
    "units": (int, "units per recurrent layer (default 128)"),
    "layers": (int, "recurrent layers (default 2)"),
    "mode": (str, "CfC mode: default | pure | no_gate"),
    "backbone-units": (int, "CfC backbone units (default 128)"),
    "backbone-layers": (int, "CfC backbone layers (default 1)"),
    "backbone-dropout": (float, "CfC backbone dropout (default 0)"),
    "ncp-output": (int, "cfc-ncp: motor neurons of the AutoNCP wiring (default 18)"),
    "ensemble": (int, "members of a deep ensemble, forecasts averaged (default 1)"),
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


_BOOLS = {
    "measured-only": "training loss on measured target values only (default on; paper off)",
    "mixed-memory": "CfC / LTC mixed memory (LSTM-style)",
    "residual": "predict the change from the current state (default on)",
    "zero-head": "with --residual, start from persistence: output head initialised to 0 (on)",
    "level-memory": "networks: learned per-variable pull towards the measured level (on)",
    "resume": "resume from the run's last checkpoint if one exists",
    "register": "register the pyfunc as icu-forecast-<model> (default on)",
    "plots": "log plot artifacts (default on)",
}


def add_train_flags(parser: argparse.ArgumentParser, exclude: set[str] = frozenset()) -> None:
    """The TrainConfig flags (shared by ``train`` and ``cv``), minus ``exclude``."""
    if "model" not in exclude:
        parser.add_argument(
            "--model", choices=MODEL_NAMES, default=None, help="model (default cfc)"
        )
    for flag, (typ, help_text) in _FLAGS.items():
        if flag not in exclude:
            parser.add_argument(f"--{flag}", type=typ, default=None, help=help_text)
    for flag, help_text in _BOOLS.items():
        if flag not in exclude:
            parser.add_argument(
                f"--{flag}", action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="rollout lengths")
    parser.add_argument("--sigmas", type=float, nargs="+", default=None, help="noise sigmas")


def configure(parser: argparse.ArgumentParser) -> None:
    add_train_flags(parser)


def train_values(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line."""
    from training.config import TrainConfig

    values = dict(vars(args))
    values["register_model"] = values.pop("register", None)
    return {k: v for k, v in values.items() if k in TrainConfig.model_fields}


def settings_from_args(args: argparse.Namespace):  # noqa: ANN201
    from training.config import TrainConfig

    return settings_from_flags(TrainConfig, train_values(args), "train")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training import tracking
    from training.train import train_model

    cfg = settings_from_args(args)
    # Said first: from another folder, relative defaults point somewhere unexpected.
    print(
        f"data: {Path(cfg.data).resolve()}  MLflow store: "
        f"{tracking.describe(tracking.tracking_uri(cfg.tracking_uri))}",
        file=sys.stderr,
    )
    result = train_model(cfg)
    if result.run_id is None:  # a non-zero DDP rank: rank 0 reports
        return 0
    m = result.metrics
    print(
        f"run {result.run_id}  model {result.model}  label {result.label}  "
        f"registered version {result.registered_version}"
    )
    print(
        "test RMSE (measured values, scaled): "
        + "  ".join(f"K={k}: {m.get(f'test/rmse_measured_k{k}', float('nan')):.4f}" for k in cfg.ks)
    )
    print(
        "test skill vs persistence [95% CI]: "
        + "  ".join(
            f"K={k}: {m.get(f'test/skill_k{k}', float('nan')):+.3f} "
            f"[{m.get(f'test/skill_k{k}_lo', float('nan')):+.3f}, "
            f"{m.get(f'test/skill_k{k}_hi', float('nan')):+.3f}]"
            for k in cfg.ks
        )
    )
    print(
        f"params {int(m.get('n_params', 0))}  peak mem {m.get('peak_mem_mb', float('nan')):.0f} MB"
    )
    return 0
