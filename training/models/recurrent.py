"""Recurrent dynamics models: ncps CfC (plain or NCP-wired), LTC, and torch GRU / LSTM.

ncps cells are called without ``timespans``: the bins are regular (12 h), and ncps 1.0.1's
per-sample timespans are broken (ncps issue #83), so the default elapsed time of 1 is used.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from features.catalog import N_STATE
from training.models.base import N_INPUT, DynamicsModel, ModelConfig, State


def _cfc_class(impl: str) -> type[nn.Module]:
    if impl == "ncps":
        from ncps.torch import CfC

        return CfC
    if impl == "fast":
        # Imported lazily: another implementation with ncps' constructor and state-dict keys.
        from training.fast_cfc import FastCfC

        return FastCfC
    raise ValueError(f"cfc_impl must be 'ncps' or 'fast', got {impl!r}")


class _NcpsStack(DynamicsModel):
    """Layers of ncps RNNs (CfC or LTC), each fed the previous layer's output, then a head."""

    def __init__(self, cfg: ModelConfig, layers: list[nn.Module], out_size: int) -> None:
        super().__init__(cfg)
        self.rnns = nn.ModuleList(layers)
        self.head = nn.Linear(out_size, N_STATE)

    def forward(self, x: Tensor) -> Tensor:
        if all(hasattr(r, "forward_time_major") and r.return_sequences for r in self.rnns):
            # FastCfC layers: chain them and the head time-major, so no layer boundary makes
            # a transposed copy; only the (B, T, 18) result is a transposed view.
            h = x.transpose(0, 1)
            for rnn in self.rnns:
                h = rnn.forward_time_major(h)
            return self._out(x, self.head(h).transpose(0, 1))
        h = x
        for rnn in self.rnns:
            h, _ = rnn(h)
        return self._out(x, self.head(h))

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> State:
        out: State = []
        for rnn in self.rnns:
            out.append(torch.zeros(batch, rnn.state_size, device=device, dtype=dtype))
            if getattr(rnn, "use_mixed", False):
                out.append(torch.zeros(batch, rnn.state_size, device=device, dtype=dtype))
        return out

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        stepper = self._stepper() if not torch.is_grad_enabled() else None
        if stepper is not None:
            out, new = stepper(x, state)
            return self._out(x, out), new
        h = x[:, None, :]
        new: State = []
        i = 0
        for rnn in self.rnns:
            if getattr(rnn, "use_mixed", False):
                hx = (state[i], state[i + 1])
                i += 2
            else:
                hx = state[i]
                i += 1
            h, hx = rnn(h, hx)
            new.extend(hx if isinstance(hx, tuple) else [hx])
        return self._out(x, self.head(h[:, 0])), new

    def fused_forecast(
        self, x: Tensor, lengths: Tensor, future: Tensor, bounds: tuple[Tensor, Tensor] | None
    ) -> Tensor | None:
        stepper = self._stepper() if not torch.is_grad_enabled() else None
        if stepper is None:
            return None
        return stepper.forecast(x, lengths, future, bounds, residual=self.cfg.residual)

    def _stepper(self):
        """FastCfC's lean single-bin inference path for the whole stack, where it applies.

        Rollouts call ``step`` once per bin for a few rows, where fixed per-call costs dominate;
        other layer types (ncps CfC, LTC, wired cells) take the module calls above.
        """
        cached = self.__dict__.get("_lean_stepper")
        layers = tuple(self.rnns)
        if cached is None or cached[0] != layers or cached[1] is not self.head:
            stepper = None
            if any(type(r).__name__ == "FastCfC" for r in layers):
                from training.fast_cfc import StackStepper

                try:
                    stepper = StackStepper(layers, self.head)
                except TypeError:  # e.g. a wired cell: the module calls handle it
                    stepper = None
            # Not a submodule or buffer: kept out of state_dict, dropped when pickled/copied.
            cached = (layers, self.head, stepper)
            self.__dict__["_lean_stepper"] = cached
        stepper = cached[2]
        return stepper if stepper is not None and stepper.applies() else None

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_lean_stepper", None)
        return state


def build_cfc(cfg: ModelConfig) -> DynamicsModel:
    cls = _cfc_class(cfg.cfc_impl)
    layers = []
    size = N_INPUT
    for _ in range(cfg.layers):
        layers.append(
            cls(
                size,
                cfg.units,
                mixed_memory=cfg.mixed_memory,
                mode=cfg.mode,
                backbone_units=cfg.backbone_units,
                backbone_layers=cfg.backbone_layers,
                backbone_dropout=cfg.backbone_dropout,
            )
        )
        size = cfg.units
    return _NcpsStack(cfg, layers, size)


def build_cfc_ncp(cfg: ModelConfig) -> DynamicsModel:
    from ncps.wirings import AutoNCP

    cls = _cfc_class(cfg.cfc_impl)
    wiring = AutoNCP(cfg.units, cfg.ncp_output, sparsity_level=cfg.ncp_sparsity, seed=22222)
    rnn = cls(N_INPUT, wiring, mixed_memory=cfg.mixed_memory, mode=cfg.mode)
    return _NcpsStack(cfg, [rnn], cfg.ncp_output)


def build_ltc(cfg: ModelConfig) -> DynamicsModel:
    from ncps.torch import LTC

    layers = []
    size = N_INPUT
    for _ in range(cfg.layers):
        layers.append(
            LTC(size, cfg.units, mixed_memory=cfg.mixed_memory, ode_unfolds=cfg.ode_unfolds)
        )
        size = cfg.units
    return _NcpsStack(cfg, layers, size)


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
