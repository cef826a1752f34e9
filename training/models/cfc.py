"""CfC (closed-form continuous-time) recurrent layers in plain torch.

Computes the function of ``ncps.torch.CfC`` (ncps 1.0.1) with the same module names and shapes,
so an ncps CfC state dict loads unchanged (tests/test_cfc.py checks outputs and gradients).
Always at ncps' default elapsed time of 1 per step: the bins are regular (12 h), and ncps'
per-sample timespans are broken anyway (ncps issue #83). Only the evaluation differs from
ncps, for speed (weights fused and arranged once per sequence, the input's projection hoisted
out of the time loop: docs/cfc.md); autograd does the backward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("default", "pure", "no_gate")


class LeCunTanh(nn.Module):
    """ncps' default backbone activation, 1.7159 tanh(0.666 x)."""

    def forward(self, x: Tensor) -> Tensor:
        return 1.7159 * torch.tanh(0.666 * x)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "lecun_tanh": LeCunTanh,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}

Hidden = Tensor | tuple[Tensor, Tensor]
"""A layer's state: h, or (h, c) with mixed memory (as ncps' CfC takes and returns it)."""


class _Weights(NamedTuple):
    """One cell's parameters arranged for a sequence (recomputed per call, so differentiable).

    The first Linear (the backbone's, or the heads' when there is no backbone) is split into the
    part acting on the input (``x_weight``, ``bias``) and the part acting on h (``h_weight_t``,
    transposed); ``layers`` are the (transposed weight, bias) of the Linears after it, the fused
    heads last. Transposing once per sequence keeps a transpose node per step out of the graph.
    """

    x_weight: Tensor
    bias: Tensor
    h_weight_t: Tensor
    layers: list[tuple[Tensor, Tensor]]


class CfCCell(nn.Module):
    """One CfC step ``(x_t, h) -> h'``: ncps' ``CfCCell`` at elapsed time 1.

    ``sparsity_mask`` (inputs + hidden, hidden), as ncps builds it for wired cells, masks
    ``ff1`` and ``ff2`` (not the time heads, as in ncps).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        mode: str = "default",
        activation: str = "lecun_tanh",
        backbone_units: int = 128,
        backbone_layers: int = 1,
        backbone_dropout: float = 0.0,
        sparsity_mask: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown CfC mode {mode!r}; choose one of {', '.join(MODES)}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown CfC activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        self.input_size, self.hidden_size, self.mode = input_size, hidden_size, mode
        self.backbone_layers, self.dropout = backbone_layers, backbone_dropout
        self._lecun = activation == "lecun_tanh" and backbone_layers > 0
        self.sparsity_mask: Tensor | None
        if sparsity_mask is not None:
            sparsity_mask = torch.from_numpy(np.abs(np.asarray(sparsity_mask).T).astype(np.float32))
        self.register_buffer("sparsity_mask", sparsity_mask)  # None: no buffer, no state key
        # Module names and order as ncps' CfCCell, so state dicts match key for key.
        self.backbone: nn.Sequential | None = None
        if backbone_layers > 0:
            act = ACTIVATIONS[activation]
            layers: list[nn.Module] = [nn.Linear(input_size + hidden_size, backbone_units), act()]
            for _ in range(1, backbone_layers):
                layers += [nn.Linear(backbone_units, backbone_units), act()]
                if backbone_dropout > 0.0:
                    layers.append(nn.Dropout(backbone_dropout))
            self.backbone = nn.Sequential(*layers)
        width = backbone_units if backbone_layers > 0 else input_size + hidden_size
        self.ff1 = nn.Linear(width, hidden_size)
        if mode == "pure":
            self.w_tau = nn.Parameter(torch.zeros(1, hidden_size))
            self.A = nn.Parameter(torch.ones(1, hidden_size))
        else:
            self.ff2 = nn.Linear(width, hidden_size)
            self.time_a = nn.Linear(width, hidden_size)
            self.time_b = nn.Linear(width, hidden_size)
        for p in self.parameters():  # ncps' initialisation
            if p.dim() == 2:
                nn.init.xavier_uniform_(p)

    def weights(self) -> _Weights:
        """The parameters arranged for :meth:`project` and :meth:`recur`."""
        mask = self.sparsity_mask
        ff1_w = self.ff1.weight if mask is None else self.ff1.weight * mask
        if self.mode == "pure":
            head_w, head_b = ff1_w, self.ff1.bias
        else:
            ff2_w = self.ff2.weight if mask is None else self.ff2.weight * mask
            ta, tb = self.time_a, self.time_b
            head_w = torch.cat([ff1_w, ff2_w, ta.weight + tb.weight])
            head_b = torch.cat([self.ff1.bias, self.ff2.bias, ta.bias + tb.bias])
        layers = [(m.weight, m.bias) for m in self.backbone or () if isinstance(m, nn.Linear)]
        layers.append((head_w, head_b))
        if self._lecun:
            # 1.7159 tanh(0.666 u): 0.666 moves into the Linear before each activation and
            # 1.7159 into the one after it, leaving a bare tanh (fewer ops per step).
            last = len(layers) - 1
            scaled = []
            for k, (w, b) in enumerate(layers):
                inner = 0.666 if k < last else 1.0
                scaled.append((w * (inner * (1.7159 if k > 0 else 1.0)), b * inner))
            layers = scaled
        (first_w, first_b), rest = layers[0], layers[1:]
        n_in = self.input_size
        rest_t = [(w.t(), b) for w, b in rest]
        return _Weights(first_w[:, :n_in], first_b, first_w[:, n_in:].t(), rest_t)

    def project(self, x: Tensor, w: _Weights) -> Tensor:
        """The input's share of the first Linear; any leading dims (a whole sequence at once)."""
        return F.linear(x, w.x_weight, w.bias)

    def recur(self, pre: Tensor, h: Tensor, w: _Weights) -> Tensor:
        """The step from the input's projection ``pre`` (B, *) and the state h (B, hidden)."""
        z = torch.addmm(pre, h, w.h_weight_t)
        for k, (weight_t, bias) in enumerate(w.layers):
            z = torch.tanh(z) if self._lecun else self.backbone[1](z)
            if k > 0 and self.dropout > 0.0:  # ncps: dropout after the 2nd, 3rd, ... layers
                z = F.dropout(z, self.dropout, self.training)
            z = torch.addmm(bias, z, weight_t)
        if self.mode == "pure":
            return -self.A * torch.exp(-(torch.abs(self.w_tau) + torch.abs(z))) * z + self.A
        ff, gate = z.split([2 * self.hidden_size, self.hidden_size], dim=1)
        ff1, ff2 = torch.tanh(ff).split(self.hidden_size, dim=1)
        gate = torch.sigmoid(gate)
        if self.mode == "no_gate":
            return torch.addcmul(ff1, gate, ff2)
        return torch.lerp(ff1, ff2, gate)


class LSTMCell(nn.Module):
    """ncps' mixed-memory LSTM cell (forget-gate bias +1), same parameter names."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_map = nn.Linear(input_size, 4 * hidden_size)
        self.recurrent_map = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        nn.init.xavier_uniform_(self.input_map.weight)
        nn.init.uniform_(self.input_map.bias, -0.1, 0.1)
        nn.init.orthogonal_(self.recurrent_map.weight)

    def recur(self, pre: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """The step from ``input_map(x)`` (``pre``) and the state (h, c)."""
        z = torch.addmm(pre, h, self.recurrent_map.weight.t())
        i, ig, fg, og = z.chunk(4, 1)
        c = c * torch.sigmoid(fg + 1.0) + torch.tanh(i) * torch.sigmoid(ig)
        return torch.tanh(c) * torch.sigmoid(og), c


class WiredCfCCell(nn.Module):
    """ncps' NCP-wired CfC: one backbone-free cell per wiring layer, masked by the wiring.

    ``wiring`` is an ``ncps.wirings.Wiring`` (e.g. ``AutoNCP``); only its public API is used.
    The state is all neurons' h, layer after layer; the output is the last (motor) layer's.
    """

    def __init__(self, input_size: int, wiring, mode: str = "default") -> None:  # noqa: ANN001
        super().__init__()
        wiring.build(input_size)
        self.layer_sizes: list[int] = []
        in_features = input_size
        for layer in range(wiring.num_layers):
            neurons = wiring.get_neurons_of_layer(layer)
            if layer == 0:
                sparsity = wiring.sensory_adjacency_matrix[:, neurons]
            else:
                previous = wiring.get_neurons_of_layer(layer - 1)
                sparsity = wiring.adjacency_matrix[:, neurons][previous, :]
            sparsity = np.concatenate([sparsity, np.ones((len(neurons), len(neurons)))], axis=0)
            cell = CfCCell(
                in_features, len(neurons), mode, backbone_layers=0, sparsity_mask=sparsity
            )
            self.add_module(f"layer_{layer}", cell)  # ncps' names
            self.layer_sizes.append(len(neurons))
            in_features = len(neurons)
        self.hidden_size = sum(self.layer_sizes)

    def weights(self) -> list[_Weights]:
        return [cell.weights() for cell in self.children()]

    def project(self, x: Tensor, w: list[_Weights]) -> Tensor:
        # Only the first layer sees x, and the layers' inputs are not known before the step.
        return x

    def recur(self, x: Tensor, h: Tensor, w: list[_Weights]) -> Tensor:
        out = []
        layers = zip(self.children(), h.split(self.layer_sizes, dim=1), w, strict=True)
        for cell, h_layer, w_layer in layers:
            x = cell.recur(cell.project(x, w_layer), h_layer, w_layer)
            out.append(x)
        return torch.cat(out, dim=1)


class CfC(nn.Module):
    """A CfC layer over batch-first sequences: ``ncps.torch.CfC``'s constructor (without
    ``proj_size``), call signature and state-dict keys.

    ``units`` is a number of neurons, or an ``ncps.wirings.Wiring`` for the NCP-wired cell
    (whose output is its motor neurons). ``step`` advances one bin.
    """

    def __init__(
        self,
        input_size: int,
        units,  # noqa: ANN001 - int or ncps.wirings.Wiring
        mixed_memory: bool = False,
        mode: str = "default",
        activation: str = "lecun_tanh",
        backbone_units: int | None = None,
        backbone_layers: int | None = None,
        backbone_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(units, int):
            self.rnn_cell: nn.Module = CfCCell(
                input_size,
                units,
                mode,
                activation,
                128 if backbone_units is None else backbone_units,
                1 if backbone_layers is None else backbone_layers,
                0.0 if backbone_dropout is None else backbone_dropout,
            )
            self.state_size = self.output_size = units
        else:
            if any(v is not None for v in (backbone_units, backbone_layers, backbone_dropout)):
                raise ValueError("a wired CfC has no backbone: drop the backbone_* arguments")
            self.rnn_cell = WiredCfCCell(input_size, units, mode)
            self.state_size, self.output_size = units.units, units.output_dim
        self.use_mixed = mixed_memory
        self._weights: _Weights | list[_Weights] | None = None  # set inside stepping()
        if mixed_memory:
            self.lstm = LSTMCell(input_size, self.state_size)

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """Within it, :meth:`step` reuses one arrangement of the cell's weights, made on entry
        (otherwise every step makes its own): for loops of steps. The parameters must not change
        inside (an optimiser step belongs outside); autograd works through it as usual."""
        previous = self._weights
        self._weights = self.rnn_cell.weights()
        try:
            yield
        finally:
            self._weights = previous

    def step(self, x: Tensor, hx: Hidden) -> tuple[Tensor, Hidden]:
        """One bin: x (B, input_size) -> (output (B, output_size), new state)."""
        h, c = self.lstm.recur(self.lstm.input_map(x), *hx) if self.use_mixed else (hx, None)
        cell, w = self.rnn_cell, self._weights
        w = cell.weights() if w is None else w
        h = cell.recur(cell.project(x, w), h, w)
        return self._output(h), ((h, c) if self.use_mixed else h)

    def forward(self, x: Tensor, hx: Hidden | None = None) -> tuple[Tensor, Hidden]:
        """x (B, T, input_size) -> (outputs (B, T, output_size), state after the last step)."""
        if hx is None:
            h = x.new_zeros(x.shape[0], self.state_size)
            c = h.clone() if self.use_mixed else None
        else:
            h, c = hx if self.use_mixed else (hx, None)
        cell = self.rnn_cell
        w = cell.weights()
        # unbind, not pre[t]: indexing's backward would zero-fill a whole-sequence gradient
        # for every step.
        pre = cell.project(x, w).unbind(1)
        if self.use_mixed:
            pre_lstm = self.lstm.input_map(x).unbind(1)
        outs = []
        for t in range(len(pre)):
            if self.use_mixed:
                h, c = self.lstm.recur(pre_lstm[t], h, c)
            h = cell.recur(pre[t], h, w)
            outs.append(h)
        return self._output(torch.stack(outs, dim=1)), ((h, c) if self.use_mixed else h)

    def _output(self, h: Tensor) -> Tensor:
        return h if self.output_size == self.state_size else h[..., -self.output_size :]
