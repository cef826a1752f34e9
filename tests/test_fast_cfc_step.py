"""The lean single-bin inference path of FastCfC stacks (rollouts) computes ncps' step."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from ncps.torch import CfC
from ncps.wirings import AutoNCP

from training.fast_cfc import FastCfC, StackStepper
from training.models import N_INPUT, ModelConfig, build_model
from training.models.recurrent import _NcpsStack
from training.rollout import continue_rollout, encode, rollout_windows

F32 = {"rtol": 1e-5, "atol": 1e-5}
F64 = {"rtol": 1e-12, "atol": 1e-12}
UNITS, B, T = 12, 5, 6


def _stacks(layers: int = 2, dtype=torch.float32, **kwargs) -> tuple[_NcpsStack, _NcpsStack]:  # noqa: ANN001
    """The training code's stack (CfC layers, linear head, residual) with ncps and FastCfC
    layers and the same parameters."""

    def build(cls: type) -> _NcpsStack:
        torch.manual_seed(0)
        sizes = [N_INPUT] + [UNITS] * (layers - 1)
        rnns = [cls(size, UNITS, **kwargs) for size in sizes]
        return _NcpsStack(ModelConfig(), rnns, UNITS).to(dtype).eval()

    ref, fast = build(CfC), build(FastCfC)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _steps(model: _NcpsStack, x: torch.Tensor, state=None, grad: bool = False):  # noqa: ANN001, ANN202
    """Outputs and states of ``model.step`` over the bins of x (B, T, 39)."""
    state = model.init_state(x.shape[0], x.device, x.dtype) if state is None else state
    ys, states = [], []
    with torch.set_grad_enabled(grad):
        for t in range(x.shape[1]):
            y, state = model.step(x[:, t], state)
            ys.append(y)
            states.append(state)
    return torch.stack(ys, 1), states


def _assert_steps_equal(ref: _NcpsStack, fast: _NcpsStack, x: torch.Tensor, tol: dict) -> None:
    assert fast._stepper() is not None  # the lean path is the one under test
    y_r, s_r = _steps(ref, x)
    y_f, s_f = _steps(fast, x)
    torch.testing.assert_close(y_f, y_r, **tol)
    for a, b in zip(s_f, s_r, strict=True):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v, **tol)
    # ... and the module path FastCfC takes with autograd on gives the same.
    y_g, _ = _steps(fast, x, grad=True)
    torch.testing.assert_close(y_f, y_g.detach(), **tol)


@pytest.mark.parametrize(
    ("mode", "mixed", "backbone_layers"),
    list(itertools.product(("default", "pure", "no_gate"), (False, True), (0, 1, 2))),
)
def test_lean_step_equals_ncps_every_mode(mode: str, mixed: bool, backbone_layers: int) -> None:
    kw = {"mode": mode, "mixed_memory": mixed, "backbone_layers": backbone_layers}
    ref, fast = _stacks(backbone_units=16, **kw)
    _assert_steps_equal(ref, fast, torch.rand(B, T, N_INPUT), F32)
    ref, fast = _stacks(backbone_units=16, dtype=torch.float64, **kw)
    _assert_steps_equal(ref, fast, torch.rand(B, T, N_INPUT, dtype=torch.float64), F64)


@pytest.mark.parametrize("activation", ["silu", "relu", "tanh", "gelu"])
def test_lean_step_equals_ncps_other_activations(activation: str) -> None:
    ref, fast = _stacks(activation=activation, backbone_layers=2, backbone_units=16)
    _assert_steps_equal(ref, fast, torch.rand(B, T, N_INPUT), F32)


@pytest.mark.parametrize("layers", [1, 3])
def test_lean_step_equals_ncps_other_depths(layers: int) -> None:
    ref, fast = _stacks(layers, dtype=torch.float64, mixed_memory=True)
    _assert_steps_equal(ref, fast, torch.rand(B, T, N_INPUT, dtype=torch.float64), F64)


def test_lean_step_of_the_training_model_single_row() -> None:
    """build_model(cfc_impl="fast") at the paper's layout, one row (the service's case)."""
    cfg = {"model": "cfc", "units": 32, "layers": 2, "backbone_units": 32}
    torch.manual_seed(0)
    ref = build_model(ModelConfig(**cfg, cfc_impl="ncps")).double().eval()
    fast = build_model(ModelConfig(**cfg, cfc_impl="fast")).double().eval()
    fast.load_state_dict(ref.state_dict())
    _assert_steps_equal(ref, fast, torch.rand(1, 10, N_INPUT, dtype=torch.float64), F64)


def test_lean_step_follows_parameter_changes() -> None:
    """Prepared weights are rebuilt after optimiser steps, load_state_dict and dtype changes."""
    ref, fast = _stacks(mixed_memory=True)
    x = torch.rand(B, T, N_INPUT)
    before, _ = _steps(fast, x)
    optimiser = torch.optim.SGD(fast.parameters(), lr=0.5)
    fast(x).square().mean().backward()
    optimiser.step()
    ref.load_state_dict(fast.state_dict())
    after, _ = _steps(fast, x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _steps(ref, x)[0], **F32)
    # The head is part of the stepper's weights too.
    with torch.no_grad():
        fast.head.bias.add_(1.0)
        ref.head.bias.add_(1.0)
    torch.testing.assert_close(_steps(fast, x)[0], _steps(ref, x)[0], **F32)
    fast.load_state_dict(_stacks(mixed_memory=True)[0].state_dict())
    ref.load_state_dict(fast.state_dict())
    torch.testing.assert_close(_steps(fast, x)[0], _steps(ref, x)[0], **F32)
    fast.double()
    ref.double()
    x64 = x.double()
    torch.testing.assert_close(_steps(fast, x64)[0], _steps(ref, x64)[0], **F64)


def test_lean_step_is_skipped_where_it_does_not_apply() -> None:
    ref, fast = _stacks(backbone_dropout=0.3, backbone_layers=2, backbone_units=16)
    assert fast._stepper() is not None  # eval mode: dropout off
    fast.train()
    assert fast._stepper() is None  # training mode with dropout: ncps' masks, module calls
    fast.eval()
    fast.rnns[0].fused = False
    assert fast._stepper() is None
    assert _steps(fast, torch.rand(B, T, N_INPUT))[0].shape == (B, T, 18)
    # Wired cells, ncps layers and GRUs never get one.
    wired = build_model(ModelConfig(model="cfc-ncp", units=24, cfc_impl="fast"))
    assert wired._stepper() is None
    assert ref._stepper() is None
    with pytest.raises(TypeError, match="unwired FastCfC"):
        StackStepper([FastCfC(N_INPUT, AutoNCP(24, 18))], torch.nn.Linear(18, 18))


def test_copies_and_pickles_carry_no_prepared_weights() -> None:
    import copy
    import pickle

    _, fast = _stacks()
    x = torch.rand(B, T, N_INPUT)
    y, _ = _steps(fast, x)
    assert "_lean_stepper" in fast.__dict__
    twin = copy.deepcopy(fast)
    assert "_lean_stepper" not in twin.__dict__
    again = pickle.loads(pickle.dumps(fast))
    torch.testing.assert_close(_steps(twin, x)[0], y, rtol=0, atol=0)
    torch.testing.assert_close(_steps(again, x)[0], y, rtol=0, atol=0)
    # The copy's stepper works on the copy's parameters, not the original's.
    with torch.no_grad():
        twin.head.bias.add_(1.0)
    assert not torch.allclose(_steps(twin, x)[0], y)
    torch.testing.assert_close(_steps(fast, x)[0], y, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gru", "lstm", "cfc", "ltc"])
def test_encode_without_masking_equals_masked_per_row(name: str) -> None:
    """encode skips the masking while every row is live: rows still match their own runs."""
    torch.manual_seed(0)
    cfg = ModelConfig(model=name, units=8, layers=2, backbone_units=8, ode_unfolds=2)
    model = build_model(cfg).double().eval()
    x = torch.rand(3, 7, N_INPUT, dtype=torch.float64)
    lengths = torch.tensor([7, 4, 5])
    ys, state, every = encode(model, x, lengths, keep_all=True)
    assert len(every) == 7
    for i, n in enumerate(lengths.tolist()):
        ys_i, state_i, _ = encode(model, x[i : i + 1, :n], lengths[i : i + 1])
        torch.testing.assert_close(ys[i : i + 1, :n], ys_i, **F64)
        for a, b in zip(state, state_i, strict=True):
            torch.testing.assert_close(a[i : i + 1], b, **F64)


def test_fast_and_ncps_rollouts_agree_in_float64() -> None:
    """Evaluation rollouts (every start, keep_all) and the Forecaster's path, fast vs ncps."""
    cfg = {"model": "cfc", "units": 16, "layers": 2, "backbone_units": 16}
    torch.manual_seed(0)
    ref = build_model(ModelConfig(**cfg, cfc_impl="ncps")).double()
    fast = build_model(ModelConfig(**cfg, cfc_impl="fast")).double()
    fast.load_state_dict(ref.state_dict())
    rng = np.random.default_rng(0)
    stays = [rng.random((n, N_INPUT)) for n in (4, 9, 6)]
    states = [s[:, :18].copy() for s in stays]
    w_ref = rollout_windows(ref, stays, states, (1, 3, 5))
    w_fast = rollout_windows(fast, stays, states, (1, 3, 5))
    for k in (1, 3, 5):
        np.testing.assert_allclose(w_fast[k].pred, w_ref[k].pred, rtol=1e-12, atol=1e-12)
    x = torch.as_tensor(rng.random((2, 6, N_INPUT)))
    lengths = torch.tensor([6, 3])
    fut = torch.as_tensor(rng.random((2, 4, 3)))
    outs = []
    for model in (ref, fast):
        ys, state, _ = encode(model, x, lengths)
        outs.append(continue_rollout(model, ys[torch.arange(2), lengths - 1], state, fut))
    torch.testing.assert_close(outs[1], outs[0], **F64)


@pytest.mark.parametrize("mode", ["default", "no_gate"])
@pytest.mark.parametrize("batch", [1, B])
def test_native_stack_step_runs_the_training_layout(mode: str, batch: int, monkeypatch) -> None:  # noqa: ANN001
    """The training layout's steps run as one native call per bin (cfc_kernels), and give what
    the torch operations and ncps give."""
    import training.fast_cfc as fast_cfc
    from training import cfc_kernels

    # Loaded (and self-checked, which steps too) before the calls are counted.
    assert cfc_kernels.for_dtype(torch.float64) is not None
    calls = []
    original = cfc_kernels.StackWeights.step
    monkeypatch.setattr(
        cfc_kernels.StackWeights, "step", lambda self, *a: calls.append(1) or original(self, *a)
    )
    ref, fast = _stacks(dtype=torch.float64, mode=mode, backbone_units=16)
    x = torch.rand(batch, T, N_INPUT, dtype=torch.float64)
    _assert_steps_equal(ref, fast, x, F64)
    assert len(calls) == T  # x[:, t] is a strided slice: taken as it is, one call per bin
    native, _ = _steps(fast, x)
    monkeypatch.setattr(fast_cfc, "_NATIVE_LOOPS", False)
    torch_ops, _ = _steps(fast, x)
    assert len(calls) == 2 * T
    torch.testing.assert_close(native, torch_ops, **F64)
    # Layouts the native step does not cover keep the torch operations.
    monkeypatch.setattr(fast_cfc, "_NATIVE_LOOPS", True)
    _, mixed = _stacks(dtype=torch.float64, mode=mode, mixed_memory=True)
    _steps(mixed, x)
    assert len(calls) == 2 * T


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bounded", [True, False])
def test_fused_forecast_equals_encode_then_continue_rollout(
    residual: bool, bounded: bool, monkeypatch
) -> None:  # noqa: ANN001
    """forecast_rollout's one native call: what encode + continue_rollout step through, for
    histories of different lengths; ncps' layers (no native path) step and agree."""
    from training import cfc_kernels
    from training.rollout import forecast_rollout

    assert cfc_kernels.for_dtype(torch.float64) is not None  # self-checked before counting
    calls = []
    original = cfc_kernels.StackWeights.forecast
    monkeypatch.setattr(
        cfc_kernels.StackWeights,
        "forecast",
        lambda self, *a, **k: calls.append(1) or original(self, *a, **k),
    )
    ref, fast = _stacks(dtype=torch.float64, backbone_units=16)
    ref.cfg.residual = fast.cfg.residual = residual
    x = torch.rand(B, T, N_INPUT, dtype=torch.float64)
    lengths = torch.tensor([T, 1, 3, T, 2])
    future = torch.rand(B, 3, 3, dtype=torch.float64)
    bounds = (
        (torch.full((18,), 0.3, dtype=torch.float64), torch.full((18,), 0.7, dtype=torch.float64))
        if bounded
        else None
    )
    got = forecast_rollout(fast, x, lengths, future, bounds)
    assert len(calls) == 1 and got.shape == (B, 4, 18)
    ys, state, _ = encode(fast, x, lengths)
    first = ys[torch.arange(B), lengths - 1]
    torch.testing.assert_close(got, continue_rollout(fast, first, state, future, bounds), **F64)
    torch.testing.assert_close(got, forecast_rollout(ref, x, lengths, future, bounds), **F64)
    assert len(calls) == 1
    if bounded:
        assert got.min() >= 0.3 and got.max() <= 0.7
