"""A deep ensemble: independently initialised members whose forecasts are averaged.

Each member is trained on its own closed-loop loss (Lakshminarayanan et al.'s deep
ensembles); a rollout feeds back the members' mean, which is what is served. Why: one
network's forecast varied a lot with its initialisation (docs/training.md, ``--ensemble``).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from training.models.base import DynamicsModel, ModelConfig, State


class Ensemble(DynamicsModel):
    def __init__(self, cfg: ModelConfig, members: list[DynamicsModel]) -> None:
        super().__init__(cfg)
        self.members = nn.ModuleList(members)
        # How many state tensors each member keeps (fixed by its type), to split the state.
        self.state_sizes = [
            len(m.init_state(1, torch.device("cpu"), torch.float32)) for m in members
        ]

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> State:
        return [t for m in self.members for t in m.init_state(batch, device, dtype)]

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        ys, new, rest = [], [], iter(state)
        for m, n in zip(self.members, self.state_sizes, strict=True):
            y, s2 = m.step(x, list(itertools.islice(rest, n)))
            ys.append(y)
            new.extend(s2)
        return torch.stack(ys).mean(dim=0), new
