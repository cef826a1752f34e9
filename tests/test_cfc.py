"""training.models.cfc computes ncps 1.0.1's CfC: same outputs and gradients from the same
state dict, over sequences (forward) and step by step (step, as rollouts and closed-loop
training chain it)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from ncps.torch import CfC as NcpsCfC
from ncps.wirings import AutoNCP

from features.catalog import N_STATE
from training.models import ModelConfig, build_model
from training.models.cfc import CfC

N_IN, UNITS, T = 7, 12, 5


def _pair(units, mixed: bool, mode: str, **backbone):  # noqa: ANN001, ANN003, ANN202
    """An ncps CfC with seeded weights and ours with its state dict, both float64."""
    torch.manual_seed(1)
    ref = NcpsCfC(N_IN, units, mixed_memory=mixed, mode=mode, **backbone).double()
    ours = CfC(N_IN, units, mixed_memory=mixed, mode=mode, **backbone).double()
    ours.load_state_dict(ref.state_dict())  # strict: every key matches
    return ref, ours


def _initial(batch: int, size: int, mixed: bool):  # noqa: ANN202
    h = 0.5 * torch.randn(batch, size, dtype=torch.float64)
    return (h, 0.5 * torch.randn(batch, size, dtype=torch.float64)) if mixed else h


def _flat(hx) -> list[torch.Tensor]:  # noqa: ANN001
    return list(hx) if isinstance(hx, tuple) else [hx]


def _assert_same_function(
    ref,  # noqa: ANN001
    ours,  # noqa: ANN001
    batch: int,
    mixed: bool,
    by_step: bool,
    stepping: bool = False,
) -> None:
    """Same outputs, final state and gradients (input, initial state, every parameter).
    ``by_step`` chains ``step`` (inside ``stepping()`` with ``stepping``) instead of ``forward``."""
    torch.manual_seed(2)
    x = torch.randn(batch, T, N_IN, dtype=torch.float64)
    hx = _initial(batch, ref.state_size, mixed)
    results = []
    for model in (ref, ours):
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        hi = tuple(h.clone().requires_grad_(True) for h in _flat(hx))
        h0 = hi if mixed else hi[0]
        if by_step:
            outs, state = [], h0
            with model.stepping() if stepping else nullcontext():
                for t in range(T):
                    out, state = model.step(xi[:, t], state)
                    outs.append(out)
            y = torch.stack(outs, dim=1)
        else:
            y, state = model(xi, h0)
        loss = (y**2).sum() + sum((s**3).sum() for s in _flat(state))
        loss.backward()
        grads = {"x": xi.grad} | {f"h{i}": h.grad for i, h in enumerate(hi)}
        # ncps keeps a wired cell's sparsity mask as a frozen parameter, ours as a buffer
        grads |= {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
        results.append((y, _flat(state), grads))
    (y_r, s_r, g_r), (y_o, s_o, g_o) = results
    torch.testing.assert_close(y_o, y_r, rtol=1e-5, atol=1e-5)
    for a, b in zip(s_o, s_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert g_o.keys() == g_r.keys()
    for key, grad in g_o.items():
        torch.testing.assert_close(grad, g_r[key], rtol=1e-5, atol=1e-5, msg=key)


class _NcpsStep:
    """ncps' CfC stepped through one-bin sequences, the reference for ``CfC.step``."""

    def __init__(self, model) -> None:  # noqa: ANN001
        self.model, self.state_size = model, model.state_size

    def step(self, x, hx):  # noqa: ANN001, ANN201
        out, hx = self.model(x[:, None], hx)
        return out[:, 0], hx

    def stepping(self) -> nullcontext:
        return nullcontext()

    def zero_grad(self) -> None:
        self.model.zero_grad()

    def named_parameters(self):  # noqa: ANN201
        return self.model.named_parameters()


@pytest.mark.parametrize("mode", ["default", "pure", "no_gate"])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("batch", [1, 3, 12])
def test_forward_and_step_equal_ncps(mode: str, mixed: bool, batch: int) -> None:
    ref, ours = _pair(UNITS, mixed, mode, backbone_units=9)
    _assert_same_function(ref, ours, batch, mixed, by_step=False)
    _assert_same_function(_NcpsStep(ref), ours, batch, mixed, by_step=True)
    _assert_same_function(_NcpsStep(ref), ours, batch, mixed, by_step=True, stepping=True)


@pytest.mark.parametrize(
    "backbone",
    [
        {"backbone_layers": 0},
        {"backbone_units": 6, "backbone_layers": 3},
        {"backbone_units": 6, "backbone_layers": 2, "activation": "silu"},
    ],
)
def test_backbone_shapes_equal_ncps(backbone: dict) -> None:
    ref, ours = _pair(UNITS, True, "default", **backbone)
    _assert_same_function(ref, ours, 4, True, by_step=False)


@pytest.mark.parametrize("mode", ["default", "pure"])
@pytest.mark.parametrize("mixed", [False, True])
def test_wired_cfc_equals_ncps(mode: str, mixed: bool) -> None:
    torch.manual_seed(1)
    ref = NcpsCfC(N_IN, AutoNCP(16, 4, seed=3), mixed_memory=mixed, mode=mode).double()
    ours = CfC(N_IN, AutoNCP(16, 4, seed=3), mixed_memory=mixed, mode=mode).double()
    ours.load_state_dict(ref.state_dict())
    assert ours.output_size == 4
    _assert_same_function(ref, ours, 3, mixed, by_step=False)
    _assert_same_function(_NcpsStep(ref), ours, 3, mixed, by_step=True, stepping=True)


def test_backbone_dropout_is_active_only_in_training() -> None:
    ref, ours = _pair(UNITS, False, "default", backbone_layers=2, backbone_dropout=0.5)
    x = torch.randn(4, T, N_IN, dtype=torch.float64)
    ours.eval()
    torch.testing.assert_close(ours(x)[0], ours(x)[0])
    ours.train()
    assert not torch.equal(ours(x)[0], ours(x)[0])


@pytest.mark.parametrize("model", ["cfc", "cfc-ncp"])
def test_models_on_both_implementations_agree(model: str) -> None:
    """The training model with ``cfc_impl="torch"`` (default) and ``"ncps"``: one state dict,
    the same teacher-forced predictions and the same steps."""
    cfg = {"model": model, "units": 16, "layers": 2, "backbone_units": 8, "ncp_output": 4}
    torch.manual_seed(0)
    ours = build_model(ModelConfig(**cfg)).double()
    ref = build_model(ModelConfig(**cfg, cfc_impl="ncps")).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6, 2 * N_STATE + 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-7, atol=1e-7)
    state_o, state_r = ours.init_state(3, x.device, x.dtype), ref.init_state(3, x.device, x.dtype)
    with ours.stepping(), ref.stepping():
        for t in range(x.shape[1]):
            y_o, state_o = ours.step(x[:, t], state_o)
            y_r, state_r = ref.step(x[:, t], state_r)
            torch.testing.assert_close(y_o, y_r, rtol=1e-7, atol=1e-7)


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="mode 'fast'"):
        CfC(N_IN, UNITS, mode="fast")


def test_models_saved_with_the_former_fast_implementation_load_as_torch() -> None:
    """``cfc_impl="fast"`` (removed; it had ncps' state-dict keys too) in a saved config."""
    cfg = ModelConfig.from_dict({"model": "cfc", "units": 8, "cfc_impl": "fast"})
    assert cfg.cfc_impl == "torch"
    assert isinstance(build_model(cfg).rnns[0], CfC)


def test_a_model_saved_before_ensembles_existed_loads_as_one_network(tmp_path) -> None:
    """A config from before ``ensemble`` and ``zero_head`` (a registered champion) rebuilds the
    single network it was, so its state dict loads."""
    old = {k: v for k, v in ModelConfig(model="gru", units=8, ensemble=1).to_dict().items()}
    del old["ensemble"], old["zero_head"]
    state = build_model(ModelConfig(model="gru", units=8, ensemble=1)).state_dict()
    rebuilt = build_model(ModelConfig.from_dict(old))
    rebuilt.load_state_dict(state)  # strict: same keys and shapes
    assert ModelConfig.from_dict(old).ensemble == 1
    assert ModelConfig.from_dict({**old, "ensemble": 3}).ensemble == 3  # a saved value wins
