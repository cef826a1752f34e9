"""Plain ``nn.Module`` dynamics models (:class:`~training.models.base.DynamicsModel`): one
step maps bin t's inputs to the scaled state at t+1."""

from training.models.base import N_INPUT, DynamicsModel, ModelConfig
from training.models.factory import MODEL_NAMES, build_model, count_parameters

__all__ = [
    "MODEL_NAMES",
    "N_INPUT",
    "DynamicsModel",
    "ModelConfig",
    "build_model",
    "count_parameters",
]
