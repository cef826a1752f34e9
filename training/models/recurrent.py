"""Recurrent dynamics models: CfC (plain or NCP-wired), ncps LTC, and torch GRU / LSTM.

CfC is :mod:`training.models.cfc` (``cfc_impl="torch"``) or ncps' reference (``"ncps"``).
ncps cells are called without ``timespans``, at elapsed time 1 as in :mod:`training.models.cfc`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from features.catalog import N_STATE
from training.models.base import N_INPUT, DynamicsModel, ModelConfig, State
from training.models.cfc import CfC


class _NcpsStack(DynamicsModel):
    """Layers of CfC or ncps LTC RNNs, each fed the previous layer's output, then a head."""

    def __init__(self, cfg: ModelConfig, layers: list[nn.Module], out_size: int) -> None:
        super().__init__(cfg)
        self.rnns = nn.ModuleList(layers)
        self.head = nn.Linear(out_size, N_STATE)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for rnn in self.rnns:
            h, _ = rnn(h)
        return self._out(x, self.head(h))

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> State:
        out: State = []
        for rnn in self.rnns:
            z = torch.zeros(batch, rnn.state_size, device=device, dtype=dtype)
            out += [z, z.clone()] if rnn.use_mixed else [z]
        return out

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        h, new, rest = x, [], iter(state)
        for rnn in self.rnns:
            hx = (next(rest), next(rest)) if rnn.use_mixed else next(rest)
            if isinstance(rnn, CfC):
                h, hx = rnn.step(h, hx)
            else:  # ncps modules take sequences: a sequence of one bin
                out, hx = rnn(h[:, None, :], hx)
                h = out[:, 0]
            new.extend(hx if isinstance(hx, tuple) else [hx])
        return self._out(x, self.head(h)), new


def _cfc_class(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.cfc_impl == "ncps":  # the reference implementation, same state-dict keys
        from ncps.torch import CfC as NcpsCfC

        return NcpsCfC
    if cfg.cfc_impl != "torch":
        raise ValueError(f"cfc_impl must be 'torch' or 'ncps', got {cfg.cfc_impl!r}")
    return CfC


def build_cfc(cfg: ModelConfig) -> DynamicsModel:
    cls = _cfc_class(cfg)
    kw = {"backbone_units": cfg.backbone_units, "backbone_layers": cfg.backbone_layers}
    kw |= {"backbone_dropout": cfg.backbone_dropout, "mode": cfg.mode}
    return _stack(cfg, lambda size: cls(size, cfg.units, mixed_memory=cfg.mixed_memory, **kw))


def build_ltc(cfg: ModelConfig) -> DynamicsModel:
    from ncps.torch import LTC

    kw = {"mixed_memory": cfg.mixed_memory, "ode_unfolds": cfg.ode_unfolds}
    return _stack(cfg, lambda size: LTC(size, cfg.units, **kw))


def _stack(cfg: ModelConfig, layer: Callable[[int], nn.Module]) -> DynamicsModel:
    """``cfg.layers`` layers of ``cfg.units``, the first fed the model input."""
    sizes = [N_INPUT, *[cfg.units] * (cfg.layers - 1)]
    return _NcpsStack(cfg, [layer(size) for size in sizes], cfg.units)


def build_cfc_ncp(cfg: ModelConfig) -> DynamicsModel:
    from ncps.wirings import AutoNCP

    wiring = AutoNCP(cfg.units, cfg.ncp_output, sparsity_level=cfg.ncp_sparsity, seed=22222)
    rnn = _cfc_class(cfg)(N_INPUT, wiring, mixed_memory=cfg.mixed_memory, mode=cfg.mode)
    return _NcpsStack(cfg, [rnn], cfg.ncp_output)


class TorchRNN(DynamicsModel):
    """``nn.GRU`` / ``nn.LSTM`` with ``layers`` x ``units`` and a linear head."""

    def __init__(self, cfg: ModelConfig, kind: str) -> None:
        super().__init__(cfg)
        cls = {"gru": nn.GRU, "lstm": nn.LSTM}[kind]
        self.is_lstm = kind == "lstm"
        self.rnn = cls(N_INPUT, cfg.units, num_layers=cfg.layers, batch_first=True)
        self.head = nn.Linear(cfg.units, N_STATE)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)
        return self._out(x, self.head(h))

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> State:
        z = torch.zeros(batch, self.cfg.layers, self.cfg.units, device=device, dtype=dtype)
        return [z, z.clone()] if self.is_lstm else [z]

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        # nn.GRU / nn.LSTM keep (layers, B, H); the rollout code wants the batch first.
        hx = [s.transpose(0, 1).contiguous() for s in state]
        out, hn = self.rnn(x[:, None, :], tuple(hx) if self.is_lstm else hx[0])
        hn = list(hn) if self.is_lstm else [hn]
        return self._out(x, self.head(out[:, 0])), [s.transpose(0, 1) for s in hn]
