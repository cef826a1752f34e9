"""``icu-forecast train``: train and evaluate one model, log it to MLflow."""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from types import NoneType, UnionType
from typing import Any, Literal, get_args, get_origin

from pydantic.fields import FieldInfo

from features.settings import settings_from_namespace


def _flag_options(name: str, field: FieldInfo, paper: dict[str, object]) -> dict[str, Any]:
    """argparse options of the flag of TrainConfig field ``name``: its type from the
    annotation, its help from the field's description, default and paper-preset value."""
    typ = field.annotation
    if get_origin(typ) is UnionType:  # ``int | None``: the flag takes an int
        typ = next(t for t in get_args(typ) if t is not NoneType)
    shown = f"default {field.default}" if field.default is not None else ""
    if name in paper:
        shown += f"; paper {paper[name]}"
    # Every flag defaults to None: only the flags given override env vars and defaults.
    options: dict[str, Any] = {"default": None, "help": field.description}
    options["help"] += f" ({shown})" if shown else ""
    if typ is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif get_origin(typ) is Literal:
        options["choices"] = get_args(typ)
    elif get_origin(typ) is tuple:
        options |= {"type": get_args(typ)[0], "nargs": "+"}
    else:
        options["type"] = typ if typ in (int, float) else str
    return options


def add_train_flags(parser: argparse.ArgumentParser, exclude: set[str] = frozenset()) -> None:
    """A flag per TrainConfig field (shared by ``train`` and ``cv``), minus ``exclude``."""
    from training.config import PRESETS, TrainConfig

    for name, field in TrainConfig.model_fields.items():
        flag = "register" if name == "register_model" else name.replace("_", "-")
        if flag not in exclude:
            options = _flag_options(name, field, PRESETS["paper"])
            parser.add_argument(f"--{flag}", dest=name, **options)


configure = add_train_flags


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training import tracking
    from training.config import TrainConfig
    from training.train import train_model

    cfg = settings_from_namespace(TrainConfig, args, "train")
    # Said first: from another folder, relative defaults point somewhere unexpected.
    print(
        f"data: {Path(cfg.data).resolve()}  MLflow store: "
        f"{tracking.describe(tracking.tracking_uri(cfg.tracking_uri))}",
        file=sys.stderr,
    )
    result = train_model(cfg)
    if result.run_id is None:  # a non-zero DDP rank: rank 0 reports
        return 0
    m = defaultdict(lambda: float("nan"), result.metrics)
    print(
        f"run {result.run_id}  model {result.model}  label {result.label}  "
        f"registered version {result.registered_version}"
    )
    rmse = (f"K={k}: {m[f'test/rmse_measured_k{k}']:.4f}" for k in cfg.ks)
    print("test RMSE (measured values, scaled): " + "  ".join(rmse))
    skill = (
        f"K={k}: {m[f'test/skill_k{k}']:+.3f} "
        f"[{m[f'test/skill_k{k}_lo']:+.3f}, {m[f'test/skill_k{k}_hi']:+.3f}]"
        for k in cfg.ks
    )
    print("test skill vs persistence [95% CI]: " + "  ".join(skill))
    print(f"params {int(m.get('n_params', 0))}  peak mem {m['peak_mem_mb']:.0f} MB")
    return 0
