"""The interface every dynamics model implements, and its typed configuration."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from features.catalog import N_INTERVENTION, N_STATE
from training.models.cfc import CfC

N_INPUT = 2 * N_STATE + N_INTERVENTION
"""Model input at bin t: scaled state (18), observed mask (18), scaled interventions (3)."""

State = list[Tensor]
"""A recurrent state: tensors with the batch on dim 0 (so rows can be gathered and masked)."""


@dataclass
class ModelConfig:
    """Architecture of one model. Unused fields are ignored by the models that do not need them."""

    model: str = "cfc"
    # Sized to the data by patient-grouped CV on the development patients (docs/results.md):
    # 1 x 8, a deep ensemble of 5. With the level memory doing the per-variable averaging,
    # larger networks (1 x 16, 2 x 32, 2 x 128) only added variance on ~50 training patients.
    # The paper's 2 x 128 single networks are the paper preset.
    units: int = 8
    layers: int = 1
    # ncps CfC
    mode: Literal["default", "pure", "no_gate"] = "default"
    backbone_units: int = 8
    backbone_layers: int = 1
    backbone_dropout: float = 0.0
    mixed_memory: bool = False
    cfc_impl: Literal["torch", "ncps"] = "torch"
    # cfc-ncp: AutoNCP wiring with this many motor neurons (the head maps them to the state)
    ncp_output: int = 18
    ncp_sparsity: float = 0.5
    # ltc
    ode_unfolds: int = 6
    # linear baseline: ridge penalty
    ridge_alpha: float = 1.0
    # Predict the change from the current state (output = state_t + f(inputs)); same target.
    residual: bool = True
    # With residual: the output head starts at zero, so the untrained model is persistence and
    # training moves away from it only as far as the (closed-loop) loss rewards.
    zero_head: bool = True
    # The level memory's gains are a ridge fit (penalty level_alpha) on the training stays,
    # never moved by the optimiser: training.models.level, docs/training.md (--level-memory).
    level_memory: bool = True
    level_alpha: float = 1.0
    # The served forecast of a network: ``direct_weight`` times the direct K-step ridge's
    # forecast (training.models.direct, fitted in closed form on the training stays) plus the
    # rest times the network's closed-loop rollout, for steps 1..direct_horizon; later steps
    # are the rollout's. 0: the rollout alone. Why 0.5: docs/results.md ("Direct half").
    direct_weight: float = 0.5
    direct_horizon: int = 10
    # Members of a deep ensemble (training.models.ensemble); 1 = a single network.
    ensemble: int = 5

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if known.get("cfc_impl") == "fast":  # models saved before the rename: same state dict
            known["cfc_impl"] = "torch"
        # A config saved before a field existed means what the code did then (a single
        # network, default head init), not today's default: its state dict must still load.
        return cls(**(_BEFORE_FIELD_EXISTED | known))


_BEFORE_FIELD_EXISTED = {
    "ensemble": 1,
    "zero_head": False,
    "level_memory": False,
    "direct_weight": 0.0,
}


class DynamicsModel(nn.Module):
    """Base class: ``forward`` (B, T, 39) -> (B, T, 18) teacher-forced for training,
    ``init_state`` + ``step`` for rollouts; a model's ``forward`` and chained ``step`` calls
    give the same numbers."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> State:
        return []

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """Wrap a loop of :meth:`step` calls in it: every CfC layer inside the model arranges
        its weights once for the loop. The parameters must not change inside; autograd works
        through it."""
        with ExitStack() as stack:
            for m in self.modules():
                if isinstance(m, CfC):
                    stack.enter_context(m.stepping())
            yield

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:  # (B, 39) -> (B, 18)
        # A model without state (the baselines) maps each bin on its own: forward is the step.
        return self(x), state

    def _out(self, x: Tensor, delta: Tensor) -> Tensor:
        return x[..., :N_STATE] + delta if self.cfg.residual else delta
