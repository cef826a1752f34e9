"""FastCfC's compiled loops (training/cfc_kernels.c): they build here, compute what the Python
loops and ncps compute, and anything that fails to build or verify falls back to the Python
loops with a warning (issue 6)."""

from __future__ import annotations

import logging
import subprocess

import pytest
import torch
from ncps.torch import CfC

import training.fast_cfc as fast_cfc
from training import cfc_kernels
from training.fast_cfc import FastCfC

N_IN, UNITS, B = 7, 12, 5


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):  # noqa: ANN001, ANN201
    """No loaded kernels and an empty build cache, restored afterwards."""
    monkeypatch.setattr(cfc_kernels, "_loaded", {})
    monkeypatch.setenv("ICU_FORECAST_KERNEL_CACHE", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def _count_native_calls(monkeypatch) -> dict:  # noqa: ANN001
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        original = getattr(cfc_kernels.Kernels, name)

        def counted(self, *args, _name=name, _original=original):  # noqa: ANN001, ANN002, ANN202
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(cfc_kernels.Kernels, name, counted)
    return calls


def _run(model: FastCfC | CfC, x: torch.Tensor, h0: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs, final state and the gradients of every parameter, the input and h0."""
    x = x.clone().requires_grad_(True)
    h0 = h0.clone().requires_grad_(True)
    out, h = model(x, h0)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    ((out * w).sum() + h.square().sum()).backward()
    got = {"out": out.detach(), "h": h.detach(), "x.grad": x.grad, "h0.grad": h0.grad}
    got.update({f"{k}.grad": p.grad for k, p in model.named_parameters()})
    for p in model.parameters():
        p.grad = None
    return got


def test_kernels_build_and_pass_their_check_on_this_machine() -> None:
    """CI has a C compiler: the native loops must be what training runs there."""
    for dtype in (torch.float32, torch.float64):
        kernels = cfc_kernels.for_dtype(dtype)
        assert kernels is not None, f"native CfC loops unavailable for {dtype} (see the log)"
        assert kernels.path.exists()


@pytest.mark.parametrize("mode", ["default", "no_gate"])
@pytest.mark.parametrize("seq_len", [1, 6])
def test_native_loops_equal_python_loops_and_ncps(mode: str, seq_len: int, monkeypatch) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    ref = CfC(N_IN, UNITS, mode=mode, backbone_units=16).double()
    fast = FastCfC(N_IN, UNITS, mode=mode, backbone_units=16).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(B, seq_len, N_IN, dtype=torch.float64)
    h0 = torch.randn(B, UNITS, dtype=torch.float64)

    # Loaded (and self-checked, which runs both loops) before the calls are counted.
    assert cfc_kernels.for_dtype(torch.float64) is not None
    calls = _count_native_calls(monkeypatch)
    native = _run(fast, x, h0)
    assert calls == {"forward": 1, "backward": 1}
    monkeypatch.setattr(fast_cfc, "_NATIVE_LOOPS", False)
    python = _run(fast, x, h0)
    assert calls == {"forward": 1, "backward": 1}  # the Python loops ran this time
    expected = _run(ref, x, h0)
    assert native.keys() == expected.keys()
    for key, want in expected.items():
        torch.testing.assert_close(native[key], python[key], rtol=1e-12, atol=1e-12, msg=key)
        torch.testing.assert_close(native[key], want, rtol=1e-11, atol=1e-11, msg=key)

    # float32, the training dtype, against ncps at the tolerance.
    ref.float()
    fast.float()
    native32 = _run(fast.float(), x.float(), h0.float())
    expected32 = _run(ref, x.float(), h0.float())
    for key, want in expected32.items():
        torch.testing.assert_close(native32[key], want, rtol=1e-5, atol=1e-5, msg=key)


def test_python_specialised_loops_still_equal_ncps(monkeypatch) -> None:  # noqa: ANN001
    """Where the native loops are unavailable the specialised Python loops run instead."""
    monkeypatch.setattr(fast_cfc, "_NATIVE_LOOPS", False)
    calls = _count_native_calls(monkeypatch)
    for mode in ("default", "no_gate"):
        torch.manual_seed(0)
        ref = CfC(N_IN, UNITS, mode=mode, backbone_units=16)
        fast = FastCfC(N_IN, UNITS, mode=mode, backbone_units=16)
        fast.load_state_dict(ref.state_dict())
        x, h0 = torch.randn(B, 6, N_IN), torch.randn(B, UNITS)
        got, want = _run(fast, x, h0), _run(ref, x, h0)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    assert calls == {"forward": 0, "backward": 0}


def test_missing_compiler_falls_back_to_python_loops(fresh_kernels, monkeypatch, caplog) -> None:  # noqa: ANN001
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.WARNING, logger="training.cfc_kernels"):
        assert cfc_kernels.for_dtype(torch.float32) is None
    assert "no C compiler found" in caplog.text and "/nonexistent/cc" in caplog.text
    assert not fresh_kernels.exists() or not any(fresh_kernels.iterdir())
    # Training still works, on the Python loops, with ncps' results.
    torch.manual_seed(0)
    ref, fast = CfC(N_IN, UNITS), FastCfC(N_IN, UNITS)
    fast.load_state_dict(ref.state_dict())
    x, h0 = torch.randn(B, 4, N_IN), torch.randn(B, UNITS)
    got, want = _run(fast, x, h0), _run(ref, x, h0)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


def test_failed_compilation_reports_the_compiler_error(fresh_kernels, monkeypatch, caplog) -> None:  # noqa: ANN001
    broken = fresh_kernels.parent / "broken.c"
    broken.write_text("this is not C;\n")
    monkeypatch.setattr(cfc_kernels, "SOURCE", broken)
    with caplog.at_level(logging.WARNING, logger="training.cfc_kernels"):
        assert cfc_kernels.for_dtype(torch.float64) is None
    assert "compiling broken.c failed" in caplog.text
    # No half-built library left behind under the cache's final or temporary names.
    assert [p.name for p in fresh_kernels.iterdir()] == []


def test_a_library_that_fails_its_check_is_not_used(fresh_kernels, monkeypatch, caplog) -> None:  # noqa: ANN001
    def wrong(kernels) -> None:  # noqa: ANN001
        raise cfc_kernels.KernelError("hs differs from torch by 0.5")

    monkeypatch.setattr(cfc_kernels, "_compare_with_torch", wrong)
    with caplog.at_level(logging.WARNING, logger="training.cfc_kernels"):
        assert cfc_kernels.for_dtype(torch.float32) is None
    assert "hs differs from torch" in caplog.text
    assert cfc_kernels.for_dtype(torch.float32) is None  # decided once per process


def test_disabled_by_environment(fresh_kernels, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("ICU_FORECAST_CFC_KERNELS", "0")
    assert cfc_kernels.for_dtype(torch.float32) is None
    assert not fresh_kernels.exists()  # nothing was built
    assert cfc_kernels.for_dtype(torch.float16) is None  # no variant for other dtypes


def test_builds_once_then_reuses_the_cached_library(fresh_kernels, monkeypatch) -> None:  # noqa: ANN001
    compiles = []
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if "-o" in cmd:
            compiles.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(cfc_kernels.subprocess, "run", run)
    first = cfc_kernels.for_dtype(torch.float32)
    assert first is not None and len(compiles) == 1
    monkeypatch.setattr(cfc_kernels, "_loaded", {})  # a new process, the same cache
    second = cfc_kernels.for_dtype(torch.float32)
    assert second is not None and second.path == first.path and len(compiles) == 1
    assert [p.name for p in fresh_kernels.iterdir()] == [first.path.name]


def test_first_use_inside_inference_mode_and_autograd_function(fresh_kernels) -> None:  # noqa: ANN001
    """The check builds a small autograd graph; it must work wherever the first use happens."""
    with torch.inference_mode():
        assert cfc_kernels.for_dtype(torch.float64) is not None
    torch.manual_seed(0)
    cfc_kernels._loaded.clear()  # the fixture's dict: a fresh process again
    fast = FastCfC(N_IN, UNITS)
    out, _ = fast(torch.randn(B, 3, N_IN))  # first use inside _FusedSequence.forward
    out.sum().backward()
    assert cfc_kernels._loaded[torch.float32] is not None


def test_clipped_training_step_equals_ncps() -> None:
    """Gradient clipping scales every parameter's gradient in place: the hand-written weight
    gradients must be separate tensors (time_a and time_b share one formula)."""
    from training.lit import build_optimizer
    from training.models import ModelConfig, build_model
    from training.models.base import N_INPUT

    cfg = {"model": "cfc", "units": 16, "layers": 2, "backbone_units": 16}
    torch.manual_seed(0)
    ref = build_model(ModelConfig(**cfg, cfc_impl="ncps"))
    fast = build_model(ModelConfig(**cfg, cfc_impl="fast"))
    fast.load_state_dict(ref.state_dict())
    x, y = torch.rand(4, 9, N_INPUT), torch.rand(4, 9, 18)
    for model in (ref, fast):
        opt = build_optimizer(model.parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            assert norm > 1e-3  # clipping is active
            opt.step()
    for (key, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5, msg=key)


def test_native_loops_refuse_arguments_they_would_misread() -> None:
    kernels = cfc_kernels.for_dtype(torch.float32)
    assert kernels is not None
    seq_len, batch, width, n = 3, 2, 5, 4
    args = {
        "pre": torch.zeros(seq_len, batch, width), "h0": torch.zeros(batch, n),
        "h_weight": torch.zeros(width, n), "head_w": torch.zeros(3 * n, width),
        "head_b": torch.zeros(3 * n), "acts": torch.empty(seq_len, batch, width),
        "probs": torch.empty(seq_len, batch, 3 * n), "hs": torch.empty(seq_len, batch, n),
    }  # fmt: skip
    kernels.forward(True, *args.values())  # well-formed: runs
    for name, bad, match in (
        ("h_weight", torch.zeros(n, width).t(), "strides"),  # right shape, transposed
        ("head_b", torch.zeros(3 * n, dtype=torch.float64), "float64"),
        ("probs", torch.empty(seq_len, batch, 2 * n), r"expected shape \(3, 2, 12\)"),
    ):
        with pytest.raises(ValueError, match=match):
            kernels.forward(True, *{**args, name: bad}.values())


def test_native_stack_step_refuses_arguments_it_would_misread() -> None:
    kernels = cfc_kernels.for_dtype(torch.float64)
    assert kernels is not None
    n_in, z, n, out, batch = 3, 5, 4, 2, 2
    layers = [
        (torch.zeros(k + n, z, dtype=torch.float64), torch.zeros(z, dtype=torch.float64),
         torch.zeros(z, 3 * n, dtype=torch.float64), torch.zeros(3 * n, dtype=torch.float64))
        for k in (n_in, n)
    ]  # fmt: skip
    out_wt, out_b = torch.zeros(n, out, dtype=torch.float64), torch.zeros(out, dtype=torch.float64)
    stack = cfc_kernels.StackWeights(kernels, True, layers, out_wt, out_b)
    x = torch.zeros(batch, n_in, dtype=torch.float64)
    state = [torch.zeros(batch, n, dtype=torch.float64) for _ in layers]
    y, new = stack.step(x, state)  # well-formed: runs
    assert y.shape == (batch, out) and [s.shape for s in new] == [(batch, n)] * 2
    for bad_x, bad_state, match in (
        (torch.zeros(batch, n_in + 1, dtype=torch.float64), state, "x must be"),
        (torch.zeros(n_in, batch, dtype=torch.float64).t(), state, "strides"),
        (x.float(), state, "float64"),
        (x, state[:1], "2 tensors"),
        (x, [state[0], torch.zeros(batch, n + 1, dtype=torch.float64)], "expected shape"),
        (x, [state[0], torch.zeros(n, batch, dtype=torch.float64).t()], "strides"),
    ):
        with pytest.raises(ValueError, match=match):
            stack.step(bad_x, bad_state)
    with pytest.raises(ValueError, match="expected shape"):
        cfc_kernels.StackWeights(kernels, True, layers, out_wt.t(), out_b)
