"""Model names -> constructors."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from training.models.base import DynamicsModel, ModelConfig
from training.models.baselines import Linear, Persistence
from training.models.direct import DirectRidge
from training.models.level import LevelMemory
from training.models.recurrent import TorchRNN, build_cfc, build_cfc_ncp, build_ltc

_BUILDERS: dict[str, Callable[[ModelConfig], DynamicsModel]] = {
    "cfc": build_cfc,
    "cfc-ncp": build_cfc_ncp,
    "gru": lambda cfg: TorchRNN(cfg, "gru"),
    "lstm": lambda cfg: TorchRNN(cfg, "lstm"),
    "ltc": build_ltc,
    "persistence": Persistence,
    "linear": Linear,
    "level": lambda cfg: LevelMemory(cfg, Persistence(cfg)),
    # level's forecast combined with the direct ridge as the networks' are, with no network
    "level-direct": lambda cfg: LevelMemory(cfg, Persistence(cfg)),
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
BASELINES: tuple[str, ...] = ("persistence", "linear", "level", "level-direct")


def build_model(cfg: ModelConfig) -> DynamicsModel:
    if cfg.model not in _BUILDERS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODEL_NAMES)}")
    builder = _BUILDERS[cfg.model]
    if cfg.model in BASELINES:
        model = _one(builder, cfg)
    elif cfg.ensemble > 1:
        from training.models.ensemble import Ensemble

        model: DynamicsModel = Ensemble(cfg, [_one(builder, cfg) for _ in range(cfg.ensemble)])
    else:
        model = _one(builder, cfg)
    if cfg.direct_weight > 0 and (cfg.model == "level-direct" or cfg.model not in BASELINES):
        # Outside the ensemble: one ridge, fitted in closed form (training.train), for the
        # served mean.
        model.direct = DirectRidge(cfg.direct_horizon)
    return model


def _one(builder: Callable[[ModelConfig], DynamicsModel], cfg: ModelConfig) -> DynamicsModel:
    model = builder(cfg)
    head = getattr(model, "head", None)
    if cfg.residual and cfg.zero_head and isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    if cfg.level_memory and cfg.model not in BASELINES:
        return LevelMemory(cfg, model)
    return model


def count_parameters(model: nn.Module) -> int:
    """The model's size: every parameter, trained or fitted in closed form (the level gains)."""
    return int(sum(p.numel() for p in model.parameters()))
