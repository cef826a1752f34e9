"""Typed training configuration: defaults, then ``ICU_TRAIN_*`` env vars, then CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.models import MODEL_NAMES, ModelConfig

# One source for architecture defaults: TrainConfig's flat fields take ModelConfig's.
_ARCH = ModelConfig()


class TrainConfig(BaseSettings):
    """One training run: data, model architecture, optimisation, Lightning Trainer, MLflow."""

    model_config = SettingsConfigDict(env_prefix="ICU_TRAIN_", extra="forbid")

    model: Literal[MODEL_NAMES] = Field("cfc", description="model")
    preset: Literal["default", "paper"] = Field(
        "default",
        description="'paper': Zong et al.'s recipe (teacher-forced one-step MSE over all values, "
        "30 epochs, batch 64); 'default': closed-loop K-step training on measured values",
    )
    data: Path = Field(
        Path("data/processed"), description="ETL output folder (bins.parquet, data_card.json)"
    )
    # which stays train: the ETL's holdout split, or fold `fold` of a patient-grouped CV
    folds: int | None = Field(
        None, ge=2, description="train on one fold of a patient-grouped CV with this many folds"
    )
    fold: int = Field(0, ge=0, description="which fold is held out (0-based; with --folds)")
    cv_seed: int = Field(0, ge=0, description="seed of the fold assignment (with --folds)")
    cv_pool: Literal["all", "development"] = Field(
        "all", description="'development': folds over the ETL's train+val patients only (tuning)"
    )
    label: str | None = Field(None, description="run label in compare (default: the model)")
    seed: int = Field(0, ge=0, description="random seed")
    # objective (training.lit): how the model is trained and chosen
    objective: Literal["closed_loop", "teacher_forced"] = Field(
        "closed_loop", description="training loss: K-step rollouts, or the paper's one-step"
    )
    rollout_k: int = Field(
        5, ge=1, le=20, description="closed-loop training: rollout steps per start bin"
    )
    measured_only: bool = Field(True, description="training loss on measured target values only")
    monitor: Literal["val_rollout_mse", "val_loss"] = Field(
        "val_rollout_mse", description="early stopping / checkpoint metric"
    )
    # optimisation
    epochs: int = Field(150, ge=1, description="maximum epochs")
    batch_size: int = Field(16, ge=1, description="stays per batch")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW decoupled weight decay")
    grad_clip: float = Field(1.0, ge=0, description="gradient norm clip, 0 = off")
    patience: int = Field(20, ge=1, description="early-stopping patience in epochs")
    # architecture: flat flags for training.models.ModelConfig, whose defaults they take
    units: int = Field(_ARCH.units, description="units per recurrent layer")
    layers: int = Field(_ARCH.layers, description="recurrent layers")
    mode: Literal["default", "pure", "no_gate"] = Field(_ARCH.mode, description="CfC mode")
    backbone_units: int = Field(_ARCH.backbone_units, description="CfC backbone units")
    backbone_layers: int = Field(_ARCH.backbone_layers, description="CfC backbone layers")
    backbone_dropout: float = Field(_ARCH.backbone_dropout, description="CfC backbone dropout")
    mixed_memory: bool = Field(_ARCH.mixed_memory, description="CfC / LTC mixed memory")
    cfc_impl: Literal["torch", "ncps"] = Field(
        _ARCH.cfc_impl, description="CfC cell: this project's torch code, or the ncps reference"
    )
    ncp_output: int = Field(_ARCH.ncp_output, description="cfc-ncp: motor neurons of AutoNCP")
    ncp_sparsity: float = Field(_ARCH.ncp_sparsity, description="cfc-ncp: AutoNCP sparsity")
    ode_unfolds: int = Field(_ARCH.ode_unfolds, description="LTC ODE solver unfolds")
    ridge_alpha: float = Field(_ARCH.ridge_alpha, description="linear baseline ridge penalty")
    residual: bool = Field(_ARCH.residual, description="predict the change from the state")
    zero_head: bool = Field(
        _ARCH.zero_head, description="with --residual, start from persistence: output head 0"
    )
    level_memory: bool = Field(
        _ARCH.level_memory, description="networks: a fitted pull towards the measured level"
    )
    level_alpha: float = Field(
        _ARCH.level_alpha, ge=0, description="ridge penalty of the level gains' fit"
    )
    direct_weight: float = Field(
        _ARCH.direct_weight,
        ge=0,
        le=1,
        description="networks and level-direct: weight of the direct K-step ridge in the "
        "served forecast, 0 = off",
    )
    direct_horizon: int = Field(
        _ARCH.direct_horizon, ge=1, le=50, description="steps the direct ridge forecasts"
    )
    ensemble: int = Field(
        _ARCH.ensemble, ge=1, le=16, description="members of a deep ensemble, averaged"
    )
    # Lightning Trainer pass-through
    accelerator: str = Field("auto", description="Lightning accelerator: auto | cpu | gpu | ...")
    devices: str = Field("auto", description="Lightning devices: auto | N")
    strategy: str = Field("auto", description="Lightning strategy: auto | ddp | fsdp | ...")
    precision: str = Field("32-true", description="Lightning precision: 32-true | bf16-mixed ...")
    num_nodes: int = Field(1, description="Lightning num_nodes")
    num_workers: int = Field(0, description="DataLoader workers")
    threads: int | None = Field(
        None, description="torch intra-op threads (default: torch's); 1 is fastest for tiny models"
    )
    # outputs
    checkpoint_dir: Path = Field(Path("outputs/checkpoints"), description="checkpoint root")
    resume: bool = Field(False, description="resume from the run's last checkpoint if one exists")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    experiment: str = Field("icu-forecast", description="MLflow experiment")
    register_model: bool = Field(True, description="register the pyfunc as icu-forecast-<model>")
    plots: bool = Field(True, description="log plot artifacts")
    # evaluation
    ks: tuple[int, ...] = Field((1, 2, 3, 5), description="rollout lengths evaluated")
    sigmas: tuple[float, ...] = Field((0.0, 0.01, 0.02, 0.05), description="input noise sigmas")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: object) -> object:
        """A preset fills the fields the caller did not set (env vars and flags still win)."""
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @property
    def run_label(self) -> str:
        return self.label or self.model

    def model_cfg(self) -> ModelConfig:
        fields = ModelConfig.__dataclass_fields__
        return ModelConfig(**{k: getattr(self, k) for k in fields if k != "extra"})


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
        "direct_weight": 0.0,
        "ensemble": 1,
    },
}
