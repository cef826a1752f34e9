"""Typed training configuration: defaults, then ``ICU_TRAIN_*`` env vars, then CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.models.base import ModelConfig

# One source for architecture defaults: TrainConfig's flat fields take ModelConfig's.
_ARCH = ModelConfig()


class TrainConfig(BaseSettings):
    """One training run: data, model architecture, optimisation, Lightning Trainer, MLflow."""

    model_config = SettingsConfigDict(env_prefix="ICU_TRAIN_", extra="forbid")

    model: str = "cfc"
    data: Path = Path("data/processed")
    label: str | None = Field(None, description="run label in compare (default: the model)")
    seed: int = 0
    # optimisation (the paper's defaults)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    patience: int = 10
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
