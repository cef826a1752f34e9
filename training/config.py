"""Typed training configuration: defaults, then ``ICU_TRAIN_*`` env vars, then CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.models.base import ModelConfig

# One source for architecture defaults: TrainConfig's flat fields take ModelConfig's.
_ARCH = ModelConfig()


class TrainConfig(BaseSettings):
    """One training run: data, model architecture, optimisation, Lightning Trainer, MLflow."""

    model_config = SettingsConfigDict(env_prefix="ICU_TRAIN_", extra="forbid")

    model: str = "cfc"
    preset: Literal["default", "paper"] = Field(
        "default",
        description="'paper': Zong et al.'s recipe (teacher-forced one-step MSE over all values, "
        "30 epochs, batch 64); 'default': closed-loop K-step training on measured values",
    )
    data: Path = Path("data/processed")
    # which stays train: the ETL's holdout split, or fold `fold` of a patient-grouped CV
    folds: int | None = Field(None, ge=2)
    fold: int = Field(0, ge=0)
    cv_seed: int = Field(0, ge=0)
    cv_pool: Literal["all", "development"] = Field(
        "all", description="'development': folds over the ETL's train+val patients only (tuning)"
    )
    label: str | None = Field(None, description="run label in compare (default: the model)")
    seed: int = Field(0, ge=0)
    # objective (training.lit): how the model is trained and chosen
    objective: Literal["closed_loop", "teacher_forced"] = "closed_loop"
    rollout_k: int = Field(5, ge=1, le=20)
    measured_only: bool = True
    monitor: Literal["val_rollout_mse", "val_loss"] = "val_rollout_mse"
    # optimisation
    epochs: int = Field(150, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    patience: int = Field(20, ge=1)
    # architecture: flat flags for training.models.ModelConfig, whose defaults they take
    units: int = _ARCH.units
    layers: int = _ARCH.layers
    mode: Literal["default", "pure", "no_gate"] = _ARCH.mode
    backbone_units: int = _ARCH.backbone_units
    backbone_layers: int = _ARCH.backbone_layers
    backbone_dropout: float = _ARCH.backbone_dropout
    mixed_memory: bool = _ARCH.mixed_memory
    cfc_impl: Literal["torch", "ncps"] = _ARCH.cfc_impl
    ncp_output: int = _ARCH.ncp_output
    ncp_sparsity: float = _ARCH.ncp_sparsity
    ode_unfolds: int = _ARCH.ode_unfolds
    ridge_alpha: float = _ARCH.ridge_alpha
    residual: bool = _ARCH.residual
    zero_head: bool = _ARCH.zero_head
    level_memory: bool = _ARCH.level_memory
    ensemble: int = Field(_ARCH.ensemble, ge=1, le=16)
    # Lightning Trainer pass-through
    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    precision: str = "32-true"
    num_nodes: int = 1
    num_workers: int = 0
    threads: int | None = Field(
        None, description="torch intra-op threads (default: torch's); 1 is fastest for tiny models"
    )
    # outputs
    checkpoint_dir: Path = Path("outputs/checkpoints")
    resume: bool = False
    tracking_uri: str | None = None
    experiment: str = "icu-forecast"
    register_model: bool = True
    plots: bool = True
    # evaluation
    ks: tuple[int, ...] = (1, 2, 3, 5)
    sigmas: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: object) -> object:
        """A preset fills the fields the caller did not set (env vars and flags still win)."""
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from training.models import MODEL_NAMES

        if v not in MODEL_NAMES:
            raise ValueError(f"unknown model {v!r}; choose one of {', '.join(MODEL_NAMES)}")
        return v

    @property
    def run_label(self) -> str:
        return self.label or self.model

    def model_cfg(self) -> ModelConfig:
        fields = ModelConfig.__dataclass_fields__
        return ModelConfig(**{k: getattr(self, k) for k in fields if k != "extra"})

    def trainer_devices(self) -> int | str:
        return int(self.devices) if str(self.devices).isdigit() else self.devices


PRESETS: dict[str, dict[str, object]] = {
    "default": {},
    # Zong et al.'s ICU case study: Adam 1e-3, batch 64, 30 epochs, 2 x 128, one-step MSE.
    "paper": {
        "objective": "teacher_forced",
        "measured_only": False,
        "monitor": "val_loss",
        "epochs": 30,
        "batch_size": 64,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "patience": 10,
        "units": 128,
        "layers": 2,
        "backbone_dropout": 0.0,
        "backbone_units": 128,
        "zero_head": False,
        "level_memory": False,
        "ensemble": 1,
    },
}
