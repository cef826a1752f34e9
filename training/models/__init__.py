"""Plain ``nn.Module`` dynamics models: one step maps bin t's inputs to the scaled state at t+1.

Every model implements :class:`~training.models.base.DynamicsModel`: ``forward`` over whole
teacher-forced sequences (training) and ``step`` over one bin with an explicit, batch-first
recurrent state (rollouts and the service).
"""

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
