"""FastCfC computes ncps 1.0.1's CfC: same state dicts, outputs and gradients (issue 6)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from ncps.torch import CfC
from ncps.wirings import AutoNCP
from torch import nn

from training.fast_cfc import FastCfC

TOL = {"rtol": 1e-5, "atol": 1e-5}
N_IN, UNITS, B, T = 7, 12, 5, 6


def _pair(*args, fused: bool = True, seed: int = 0, **kwargs) -> tuple[CfC, FastCfC]:
    torch.manual_seed(seed)
    ref = CfC(*args, **kwargs)
    fast = FastCfC(*args, **kwargs)
    fast.fused = fused
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _loss(out, hx, weights: torch.Tensor) -> torch.Tensor:
    """A loss reaching every output and the final state, with O(1) gradients."""
    h = hx[0] + 0.5 * hx[1] if isinstance(hx, tuple) else hx
    return (out * weights).mean() + h.pow(2).mean()


def _assert_same(ref: nn.Module, fast: nn.Module, x: torch.Tensor, **fwd) -> None:
    """Outputs, final state, parameter gradients and the input gradient agree."""
    x_ref = x.clone().requires_grad_(True)
    x_fast = x.clone().requires_grad_(True)
    out_ref, hx_ref = ref(x_ref, **fwd)
    out_fast, hx_fast = fast(x_fast, **fwd)
    torch.testing.assert_close(out_fast, out_ref, **TOL)
    torch.testing.assert_close(hx_fast, hx_ref, **TOL)
    with torch.no_grad():  # inference takes its own lean loop
        out_nograd, hx_nograd = fast(x, **fwd)
    torch.testing.assert_close(out_nograd, out_ref.detach(), **TOL)
    torch.testing.assert_close(hx_nograd, hx_ref, **TOL)
    weights = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1))
    _loss(out_ref, hx_ref, weights).backward()
    _loss(out_fast, hx_fast, weights).backward()
    grads_ref = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
    grads_fast = {k: p.grad for k, p in fast.named_parameters() if p.requires_grad}
    assert grads_ref.keys() == grads_fast.keys()
    for key, g in grads_ref.items():
        assert g is not None and grads_fast[key] is not None, key
        torch.testing.assert_close(grads_fast[key], g, **TOL, msg=lambda m, k=key: f"{k}: {m}")
    torch.testing.assert_close(x_fast.grad, x_ref.grad, **TOL)


@pytest.mark.parametrize(
    ("mode", "mixed", "backbone_layers", "fused"),
    list(
        itertools.product(("default", "pure", "no_gate"), (False, True), (0, 1, 2), (True, False))
    ),
)
def test_equals_ncps_every_mode(mode: str, mixed: bool, backbone_layers: int, fused: bool) -> None:
    ref, fast = _pair(
        N_IN, UNITS, mode=mode, mixed_memory=mixed, backbone_layers=backbone_layers,
        backbone_units=16, proj_size=4, fused=fused,
    )  # fmt: skip
    _assert_same(ref, fast, torch.randn(B, T, N_IN))


@pytest.mark.parametrize("activation", ["silu", "relu", "tanh", "gelu"])
def test_equals_ncps_other_backbone_activations(activation: str) -> None:
    ref, fast = _pair(N_IN, UNITS, activation=activation, backbone_layers=2, backbone_units=16)
    _assert_same(ref, fast, torch.randn(B, T, N_IN))


@pytest.mark.parametrize("mixed", [False, True])
def test_two_stacked_modules_as_training_stacks_them(mixed: bool) -> None:
    """training.models stacks `layers` CfC modules, each fed the previous one's outputs."""

    def stack(cls: type) -> nn.Module:
        torch.manual_seed(3)
        return nn.ModuleList(
            [cls(N_IN, UNITS, mixed_memory=mixed), cls(UNITS, UNITS, mixed_memory=mixed)]
        )

    class Seq(nn.Module):
        def __init__(self, rnns: nn.ModuleList) -> None:
            super().__init__()
            self.rnns = rnns

        def forward(self, x):  # noqa: ANN001, ANN202
            hx = None
            for rnn in self.rnns:
                x, hx = rnn(x)
            return x, hx

    ref, fast = Seq(stack(CfC)), Seq(stack(FastCfC))
    fast.load_state_dict(ref.state_dict())
    _assert_same(ref, fast, torch.randn(B, T, N_IN))


def test_training_model_with_fast_impl_equals_ncps_impl() -> None:
    """The training code's CfC (2 x units, head, residual) with cfc_impl fast vs ncps."""
    from training.models import ModelConfig, build_model
    from training.models.base import N_INPUT

    torch.manual_seed(0)
    ref = build_model(ModelConfig(model="cfc", units=16, layers=2, backbone_units=16))
    fast = build_model(
        ModelConfig(model="cfc", units=16, layers=2, backbone_units=16, cfc_impl="fast")
    )
    assert all(isinstance(r, FastCfC) for r in fast.rnns)
    assert list(ref.state_dict()) == list(fast.state_dict())
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(4, 9, N_INPUT)
    torch.testing.assert_close(fast(x), ref(x), **TOL)
    ref(x).square().mean().backward()
    fast(x).square().mean().backward()
    for (key, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=lambda m, k=key: f"{k}: {m}")
    # Rollouts call `step` one bin at a time with explicit states.
    with torch.no_grad():
        state_r = ref.init_state(4, x.device, x.dtype)
        state_f = fast.init_state(4, x.device, x.dtype)
        for t in range(x.shape[1]):
            y_r, state_r = ref.step(x[:, t], state_r)
            y_f, state_f = fast.step(x[:, t], state_f)
            torch.testing.assert_close(y_f, y_r, **TOL)


@pytest.mark.parametrize("mode", ["default", "pure", "no_gate"])
@pytest.mark.parametrize("mixed", [False, True])
def test_equals_ncps_wired_ncp(mode: str, mixed: bool) -> None:
    def make(cls: type) -> nn.Module:
        torch.manual_seed(0)
        wiring = AutoNCP(16, 4, sparsity_level=0.5, seed=22222)
        return cls(N_IN, wiring, mode=mode, mixed_memory=mixed, proj_size=3)

    ref, fast = make(CfC), make(FastCfC)
    fast.load_state_dict(ref.state_dict())
    _assert_same(ref, fast, torch.randn(B, T, N_IN))


def test_state_dicts_move_both_ways_unchanged() -> None:
    for kwargs in ({"mixed_memory": True, "proj_size": 3, "backbone_layers": 2}, {"mode": "pure"}):
        ref, fast = _pair(N_IN, UNITS, **kwargs)
        sd_ref, sd_fast = ref.state_dict(), fast.state_dict()
        assert list(sd_ref) == list(sd_fast)
        assert all(sd_ref[k].shape == sd_fast[k].shape for k in sd_ref)
        torch.manual_seed(9)
        other = CfC(N_IN, UNITS, **kwargs)
        other.load_state_dict(fast.state_dict())  # and back: strict load into ncps
        x = torch.randn(B, T, N_IN)
        torch.testing.assert_close(other(x)[0], ref(x)[0])


def test_hx_layouts_and_return_options() -> None:
    for kwargs in (
        {"batch_first": False},
        {"return_sequences": False},
        {"mixed_memory": True, "return_sequences": False, "batch_first": False},
    ):
        ref, fast = _pair(N_IN, UNITS, **kwargs)
        shape = (B, T, N_IN) if kwargs.get("batch_first", True) else (T, B, N_IN)
        h0 = torch.randn(B, UNITS)
        hx = (h0, torch.randn(B, UNITS)) if kwargs.get("mixed_memory") else h0
        _assert_same(ref, fast, torch.randn(*shape), hx=hx)
    # Unbatched (L, C) input with a 1-D state.
    ref, fast = _pair(N_IN, UNITS)
    x, h0 = torch.randn(T, N_IN), torch.randn(UNITS)
    out_r, h_r = ref(x, h0)
    out_f, h_f = fast(x, h0)
    assert out_f.shape == out_r.shape == (T, UNITS) and h_f.shape == (UNITS,)
    torch.testing.assert_close(out_f, out_r, **TOL)
    torch.testing.assert_close(h_f, h_r, **TOL)


def _reference_with_timespans(ref: CfC, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """ncps' own cells stepped by hand with a (B, 1) elapsed time per sample (issue #83's
    intended semantics: ncps squeezes the (B,) column and broadcasts it over units)."""
    h = torch.zeros(x.shape[0], ref.state_size)
    c = torch.zeros_like(h)
    outs = []
    for t in range(x.shape[1]):
        if ref.use_mixed:
            h, c = ref.lstm(x[:, t], (h, c))
        out, h = ref.rnn_cell(x[:, t], h, ts[:, t].reshape(-1, 1))
        outs.append(ref.fc(out))
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("mode", ["default", "pure", "no_gate"])
@pytest.mark.parametrize("fused", [True, False])
def test_per_sample_timespans(mode: str, fused: bool) -> None:
    ref, fast = _pair(N_IN, UNITS, mode=mode, mixed_memory=True, proj_size=3, fused=fused)
    x = torch.randn(B, T, N_IN)
    ts = torch.rand(B, T) * 2.0 + 0.1
    expected = _reference_with_timespans(ref, x, ts)
    for shaped in (ts, ts[..., None]):
        out, _ = fast(x, timespans=shaped)
        torch.testing.assert_close(out, expected, **TOL)
        with torch.no_grad():
            torch.testing.assert_close(fast(x, timespans=shaped)[0], expected.detach(), **TOL)
    # Gradients through the time-dependent path as well.
    params = dict(ref.named_parameters())
    weights = torch.randn(expected.shape)
    (expected * weights).mean().backward()
    out, _ = fast(x, timespans=ts)
    (out * weights).mean().backward()
    for key, p in fast.named_parameters():
        torch.testing.assert_close(
            p.grad, params[key].grad, **TOL, msg=lambda m, k=key: f"{k}: {m}"
        )
    # Where ncps 1.0.1 works (one sample: the squeeze gives a scalar), it agrees directly.
    out_r, _ = ref(x[:1], timespans=ts[:1])
    out_f, _ = fast(x[:1], timespans=ts[:1])
    torch.testing.assert_close(out_f, out_r, **TOL)


def test_timespans_scalar_ones_and_time_major() -> None:
    ref, fast = _pair(N_IN, UNITS, batch_first=False)
    x = torch.randn(T, B, N_IN)
    default, _ = fast(x)
    torch.testing.assert_close(fast(x, timespans=torch.ones(T, B))[0], default, **TOL)
    torch.testing.assert_close(fast(x, timespans=1.0)[0], default, **TOL)
    ts = torch.rand(T, B, 1) + 0.5
    expected = _reference_with_timespans(ref, x.transpose(0, 1), ts.transpose(0, 1))
    torch.testing.assert_close(fast(x, timespans=ts)[0], expected.transpose(0, 1), **TOL)
    with pytest.raises(ValueError, match=r"timespans must have shape \(T, B\)"):
        fast(x, timespans=torch.ones(B, T + 1))


def test_timespans_with_gradient_take_the_autograd_path() -> None:
    ref, fast = _pair(N_IN, UNITS)
    x = torch.randn(B, T, N_IN)
    ts = (torch.rand(B, T) + 0.5).requires_grad_(True)
    ts_ref = ts.detach().clone().requires_grad_(True)
    fast(x, timespans=ts)[0].sum().backward()
    _reference_with_timespans(ref, x, ts_ref).sum().backward()
    torch.testing.assert_close(ts.grad, ts_ref.grad, **TOL)


def test_backbone_dropout_draws_the_same_masks_in_training() -> None:
    ref, fast = _pair(N_IN, UNITS, backbone_layers=3, backbone_dropout=0.3)
    ref.train()
    fast.train()
    x = torch.randn(B, T, N_IN)
    torch.manual_seed(5)
    out_r, _ = ref(x)
    torch.manual_seed(5)
    out_f, _ = fast(x)
    torch.testing.assert_close(out_f, out_r, **TOL)
    ref.eval()
    fast.eval()
    _assert_same(ref, fast, x)  # eval: dropout off, the fused path


def test_float64_matches_to_rounding() -> None:
    ref, fast = _pair(N_IN, UNITS, mixed_memory=True, backbone_layers=2)
    ref.double()
    fast.double()
    x = torch.randn(B, T, N_IN, dtype=torch.float64, requires_grad=True)
    # ncps makes a float32 zero state whatever the input's dtype: pass one.
    hx = (torch.zeros(B, UNITS, dtype=torch.float64), torch.zeros(B, UNITS, dtype=torch.float64))
    out_r, _ = ref(x, hx)
    out_f, _ = fast(x, hx)
    torch.testing.assert_close(out_f, out_r, rtol=1e-11, atol=1e-11)
    (g_r,) = torch.autograd.grad(out_r.sum(), x)
    (g_f,) = torch.autograd.grad(out_f.sum(), x)
    torch.testing.assert_close(g_f, g_r, rtol=1e-11, atol=1e-11)


def test_fused_backward_passes_gradcheck() -> None:
    torch.manual_seed(0)
    fast = FastCfC(3, 4, mixed_memory=True, backbone_units=5, backbone_layers=2).double()
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0):  # noqa: ANN001, ANN202
        out, (h, c) = fast(x, (h0, c0))
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0))


def test_inference_cache_follows_parameter_updates() -> None:
    """Without autograd the rewritten weights are cached; an optimiser step must invalidate."""
    ref, fast = _pair(N_IN, UNITS, mixed_memory=True)
    x = torch.randn(B, T, N_IN)
    with torch.no_grad():
        before = fast(x)[0]
    optimiser = torch.optim.SGD(fast.parameters(), lr=0.5)
    fast(x)[0].sum().backward()
    optimiser.step()
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        after = fast(x)[0]
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, ref(x)[0], **TOL)
        fast.load_state_dict(CfC(N_IN, UNITS, mixed_memory=True).state_dict())
        assert not torch.allclose(fast(x)[0], after)


def test_two_forwards_before_backward_and_retained_graph() -> None:
    """Reused work buffers never overwrite ones a pending backward still needs."""
    ref, fast = _pair(N_IN, UNITS, backbone_layers=2)
    x1, x2 = torch.randn(B, T, N_IN), torch.randn(B, T, N_IN)
    loss_r = ref(x1)[0].square().mean() + ref(x2)[0].abs().mean()
    loss_f = fast(x1)[0].square().mean() + fast(x2)[0].abs().mean()
    loss_r.backward(retain_graph=True)
    loss_f.backward(retain_graph=True)
    with torch.no_grad():
        fast(torch.randn(B, T, N_IN))  # an inference call between the two backward passes
    loss_r.backward()
    loss_f.backward()
    for (key, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=lambda m, k=key: f"{k}: {m}")


def test_bad_input_is_named() -> None:
    fast = FastCfC(N_IN, UNITS, mixed_memory=True)
    with pytest.raises(ValueError, match="input must be 2-D"):
        fast(torch.randn(2, 3, 4, N_IN))
    with pytest.raises(RuntimeError, match="requires a tuple"):
        fast(torch.randn(B, T, N_IN), torch.zeros(B, UNITS))


@pytest.mark.slow
def test_pyfunc_logged_from_fast_model_loads_in_the_service_path(tmp_path, mlflow_uri) -> None:  # noqa: ANN001
    """A FastCfC-trained model, logged as the pyfunc, loads via mlflow.pyfunc and forecasts
    exactly what the in-memory module forecasts."""
    import mlflow

    from tests.synthetic import write_synthetic_etl_output
    from training.data import BinsDataModule
    from training.forecaster import Forecaster
    from training.models import ModelConfig, build_model
    from training.pyfunc import log_pyfunc, save_model_dir

    dm = BinsDataModule(write_synthetic_etl_output(tmp_path / "out", n_stays=12, n_bins=7))
    cfg = ModelConfig(model="cfc", units=8, layers=2, backbone_units=8, cfc_impl="fast")
    torch.manual_seed(0)
    model = build_model(cfg)
    # A few real optimisation steps with the fast implementation (weights move off their init).
    seqs = dm.sequences["train"]
    x = torch.as_tensor(np.stack([s[:6] for s in seqs.inputs if len(s) >= 7]), dtype=torch.float32)
    y = torch.as_tensor(np.stack([s[1:7] for s in seqs.state if len(s) >= 7]), dtype=torch.float32)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        optimiser.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimiser.step()
    assert isinstance(model.rnns[0], FastCfC)
    forecaster = Forecaster(model, dm.preprocessor, "cfc", config=cfg.to_dict())

    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run():
        model_dir = save_model_dir(tmp_path / "files", model, cfg, dm.preprocessor, {})
        info = log_pyfunc(model_dir, None, forecaster)
    loaded = mlflow.pyfunc.load_model(info.model_uri).unwrap_python_model().forecaster

    rng = np.random.default_rng(0)
    test = dm.sequences["test"]
    n = min(len(s) for s in test.raw_state)
    state = np.stack([s[:n] for s in test.raw_state])
    iv = np.stack([s[:n] for s in test.interventions])
    lengths = rng.integers(1, n + 1, size=len(state))
    planned = rng.uniform(0.0, 1.0, size=(len(state), 5, 3))
    expected = forecaster.forecast(state, iv, lengths, planned)
    got = loaded.forecast(state, iv, lengths, planned)
    assert got.shape == (len(state), 5, 18) and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["default", "pure", "no_gate"])
def test_general_loops_equal_ncps_for_the_specialised_layout(mode: str, monkeypatch) -> None:  # noqa: ANN001
    """The common layout (one backbone Linear, no LSTM) runs specialised loops; the general
    ones must still compute the same thing (they serve every other layout)."""
    import training.fast_cfc as fast_cfc

    monkeypatch.setattr(fast_cfc, "_SPECIALISED_LOOPS", False)
    ref, fast = _pair(N_IN, UNITS, mode=mode, backbone_units=16)
    _assert_same(ref, fast, torch.randn(B, T, N_IN))


@pytest.mark.parametrize(
    ("mode", "mixed", "dropout"),
    [("default", False, 0.0), ("pure", True, 0.0), ("no_gate", False, 0.3)],
)
def test_training_stack_time_major_path_equals_ncps(mode: str, mixed: bool, dropout: float) -> None:
    """training.models chains FastCfC layers and the head time-major (forward_time_major);
    outputs and gradients equal the ncps stack's, also in training mode with dropout."""
    from training.models import ModelConfig, build_model
    from training.models.base import N_INPUT

    cfg = {
        "model": "cfc", "units": 16, "layers": 2, "backbone_units": 16, "mode": mode,
        "mixed_memory": mixed, "backbone_layers": 2, "backbone_dropout": dropout,
    }  # fmt: skip
    torch.manual_seed(0)
    ref = build_model(ModelConfig(**cfg, cfc_impl="ncps"))
    fast = build_model(ModelConfig(**cfg, cfc_impl="fast"))
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(4, 9, N_INPUT)
    torch.manual_seed(5)
    y_ref = ref(x)
    torch.manual_seed(5)
    y_fast = fast(x)
    torch.testing.assert_close(y_fast, y_ref, **TOL)
    y_ref.square().mean().backward()
    y_fast.square().mean().backward()
    for (key, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=lambda m, k=key: f"{k}: {m}")
    with pytest.raises(ValueError, match="return_sequences"):
        FastCfC(N_IN, UNITS, return_sequences=False).forward_time_major(torch.randn(T, B, N_IN))
