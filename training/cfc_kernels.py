"""Native per-step loops for ``FastCfC``'s common layout (``cfc_kernels.c``), built on first use.

Training a 2 x 128 CfC on batches of 64 spends about 40 % of its time outside the matrix
products: the per-step elementwise operations and the Python and dispatcher overhead of issuing
them, several microseconds per operation for tensors of 64 x 384 values. ``cfc_kernels.c`` runs
each step's elementwise work as one fused pass and calls the same BLAS that torch calls for its
matrix products (torch's exported ``sgemm_`` / ``dgemm_``), so the results are those of the
Python loops up to rounding.

The C source is compiled once per machine with the system C compiler (``$CC``, else ``cc``)
into a cache folder (``$ICU_FORECAST_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/icu-forecast`` or
``~/.cache/icu-forecast``), keyed by the source, flags, compiler and CPU, and checked against
torch on a small problem before first use. Anything that fails (no compiler, no BLAS symbol,
a wrong result) is logged once and ``FastCfC`` keeps its Python loops, which compute the same
function. ``ICU_FORECAST_CFC_KERNELS=0`` turns the native loops off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["KernelError", "Kernels", "StackWeights", "for_dtype"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cfc_kernels.c")
# -fno-trapping-math lets the compiler vectorise the float-to-int step of exp (torch is built
# with it too); -march=native because the library is built on, and for, the machine using it.
CFLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fPIC", "-shared")
_VARIANTS = {torch.float32: ("float", "sgemm_"), torch.float64: ("double", "dgemm_")}

_lock = threading.Lock()
_loaded: dict[torch.dtype, Kernels | None] = {}


class KernelError(RuntimeError):
    """The native loops could not be built, loaded or verified."""


def enabled() -> bool:
    return os.environ.get("ICU_FORECAST_CFC_KERNELS", "1").strip().lower() not in {
        "0",
        "false",
        "no",
        "off",
    }


def cache_dir() -> Path:
    if env := os.environ.get("ICU_FORECAST_KERNEL_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "icu-forecast"


def _cpu_signature() -> str:
    # -march=native code is only valid on a CPU with the same instruction sets.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or "cc"
    parts = cc.split()
    if not parts or shutil.which(parts[0]) is None:
        raise KernelError(f"no C compiler found (CC={cc!r})")
    return parts


def _build(real: str) -> Path:
    cc = _compiler()
    try:
        version = subprocess.run(
            [*cc, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelError(f"C compiler {cc[0]!r} does not run: {exc}") from exc
    defines = ["-DCFC_DOUBLE"] if real == "double" else []
    key = hashlib.sha256(
        "\0".join(
            [SOURCE.read_text(), *CFLAGS, *defines, version, platform.machine(), _cpu_signature()]
        ).encode()
    ).hexdigest()[:20]
    target = cache_dir() / f"cfc_kernels-{real}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: concurrent first uses never load half a file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run(
            [*cc, *CFLAGS, *defines, "-o", tmp, str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise KernelError(f"compiling {SOURCE.name} failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _blas_symbol(name: str) -> int:
    """The address of torch's BLAS routine ``name`` (Fortran interface)."""
    lib_dir = Path(torch.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libtorch_cpu.*"))
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
            return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    raise KernelError(f"torch's CPU library exports no {name} (looked in {lib_dir})")


def _check_shapes(*groups: tuple) -> None:
    for *tensors, shape in groups:
        for t in tensors:
            if tuple(t.shape) != shape:
                raise ValueError(f"native CfC loops: expected shape {shape}, got {tuple(t.shape)}")


def _pointers(dtype: torch.dtype, *tensors: Tensor) -> list[int]:
    # The C loops trust their arguments: a strided or wrongly typed tensor would be read
    # out of bounds, so check what is cheap to check.
    for t in tensors:
        if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(
                f"native CfC loops need contiguous CPU {dtype} tensors, got {t.dtype} on "
                f"{t.device} with strides {t.stride()} for shape {tuple(t.shape)}"
            )
    return [t.data_ptr() for t in tensors]


class Kernels:
    """The compiled loops for one dtype. Arguments are contiguous CPU tensors of that dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        real, gemm = _VARIANTS[dtype]
        self.dtype = dtype
        self.path = _build(real)
        try:
            self._lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise KernelError(f"loading {self.path} failed: {exc}") from exc
        self._gemm = _blas_symbol(gemm)
        i, p = ctypes.c_int, ctypes.c_void_p
        self._forward = self._lib.cfc_forward
        self._forward.argtypes = [i, i, i, i, i, p, p, p, p, p, p, p, p, p]
        self._forward.restype = None
        self._backward = self._lib.cfc_backward
        self._backward.argtypes = [i, i, i, i, i, p, p, p, p, p, p, p, p, p, p]
        self._backward.restype = None
        self._stack_step = self._lib.cfc_stack_step
        self._stack_step.argtypes = [*[i] * 7, p, i, *[p] * 11]
        self._stack_step.restype = None
        self._stack_forecast = self._lib.cfc_stack_forecast
        self._stack_forecast.argtypes = [*[i] * 10, *[p] * 14]
        self._stack_forecast.restype = None

    def forward(self, lerp: bool, pre, h0, h_weight, head_w, head_b, acts, probs, hs) -> None:
        """Fills ``acts`` (T,B,Z), ``probs`` (T,B,3N) and ``hs`` (T,B,N); see cfc_kernels.c."""
        (seq_len, batch, width), n = pre.shape, hs.shape[2]
        _check_shapes(
            (pre, acts, (seq_len, batch, width)), (h0, (batch, n)), (h_weight, (width, n)),
            (head_w, (3 * n, width)), (head_b, (3 * n,)), (probs, (seq_len, batch, 3 * n)),
            (hs, (seq_len, batch, n)),
        )  # fmt: skip
        ptrs = _pointers(self.dtype, pre, h0, h_weight, head_w, head_b, acts, probs, hs)
        self._forward(seq_len, batch, width, n, int(lerp), *ptrs, self._gemm)

    def backward(
        self, lerp: bool, d_hs, acts, probs, h_weight, head_w, d_heads, d_pre, dh0, scratch
    ) -> None:
        """Fills ``d_heads``, ``d_pre`` and ``dh0`` (gradient of the initial state)."""
        (seq_len, batch, width), n = acts.shape, d_hs.shape[2]
        _check_shapes(
            (acts, d_pre, (seq_len, batch, width)), (d_hs, (seq_len, batch, n)),
            (probs, d_heads, (seq_len, batch, 3 * n)), (h_weight, (width, n)),
            (head_w, (3 * n, width)), (dh0, (batch, n)), (scratch, (batch, width)),
        )  # fmt: skip
        ptrs = _pointers(
            self.dtype, d_hs, acts, probs, h_weight, head_w, d_heads, d_pre, dh0, scratch
        )
        self._backward(seq_len, batch, width, n, int(lerp), *ptrs, self._gemm)


class StackWeights:
    """A stack of layers in the native layout plus a linear output head, for one step at a time.

    Built once from prepared weights (``training.fast_cfc.StackStepper`` caches it with them);
    per layer: ``xh_wt`` (K, Z) acting on ``[input, h]`` (K = input width + N), ``b0`` (Z),
    ``head_wt`` (Z, 3N), ``head_b`` (3N); then ``out_wt`` (N, O) and ``out_b`` (O). The weights
    are checked here, once; each step checks only its own arguments.
    """

    def __init__(self, kernels: Kernels, lerp: bool, layers, out_wt: Tensor, out_b: Tensor):
        if not layers:
            raise ValueError("native CfC stack: no layers")
        n = layers[0][2].shape[1] // 3
        z = layers[0][0].shape[1]
        self.input_width = layers[0][0].shape[0] - n
        for k, (xh_wt, b0, head_wt, head_b) in enumerate(layers):
            width = self.input_width + n if k == 0 else 2 * n
            _check_shapes(
                (xh_wt, (width, z)), (b0, (z,)), (head_wt, (z, 3 * n)), (head_b, (3 * n,))
            )
            _pointers(kernels.dtype, xh_wt, b0, head_wt, head_b)
        self.outputs = out_wt.shape[1]
        _check_shapes((out_wt, (n, self.outputs)), (out_b, (self.outputs,)))
        _pointers(kernels.dtype, out_wt, out_b)
        self.kernels, self.lerp, self.hidden, self.backbone = kernels, lerp, n, z
        self._keep = (layers, out_wt, out_b)  # the pointers below stay valid while this lives
        arrays = [
            (ctypes.c_void_p * len(layers))(*(t.data_ptr() for t in col))
            for col in zip(*layers, strict=True)
        ]
        self._xh_wt, self._b0, self._head_wt, self._head_b = arrays
        self._out = (out_wt.data_ptr(), out_b.data_ptr())
        self._scratch_width = max(self.input_width, n) + n + z + 3 * n

    def step(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """``x`` (B, I), rows contiguous (a time slice of (B, T, I) will do); ``state``: one
        (B, N) tensor per layer. Returns the head output (B, O) and the new states."""
        k = self.kernels
        layers = len(self._b0)
        if (
            x.dim() != 2 or x.shape[1] != self.input_width or x.stride(1) != 1
            or x.dtype != k.dtype or x.device.type != "cpu" or len(state) != layers
        ):  # fmt: skip
            raise ValueError(
                f"native CfC stack: x must be (B, {self.input_width}) {k.dtype} with contiguous "
                f"rows and state {layers} tensors, got {tuple(x.shape)} {x.dtype} strides "
                f"{x.stride()} and {len(state)} states"
            )
        batch = x.shape[0]
        _check_shapes((*state, (batch, self.hidden)))
        h = (ctypes.c_void_p * layers)(*_pointers(k.dtype, *state))
        new = x.new_empty(layers, batch, self.hidden)
        step = self.hidden * batch * new.element_size()
        h_new = (ctypes.c_void_p * layers)(*(new.data_ptr() + i * step for i in range(layers)))
        out = x.new_empty(batch, self.outputs)
        scratch = x.new_empty(batch * self._scratch_width)
        k._stack_step(
            batch, layers, self.input_width, self.backbone, self.hidden, self.outputs,
            int(self.lerp), x.data_ptr(), x.stride(0), h, h_new, self._xh_wt, self._b0,
            self._head_wt, self._head_b, *self._out, out.data_ptr(), scratch.data_ptr(), k._gemm,
        )  # fmt: skip
        return out, list(new.unbind(0))

    def forecast(
        self,
        x: Tensor,
        lengths: Tensor,
        future: Tensor,
        bounds: tuple[Tensor, Tensor] | None,
        residual: bool,
    ) -> Tensor:
        """The history bins of ``x`` (B, T, I) through the stack, each row up to its
        ``lengths`` (B,) int64, then one step per bin of ``future`` (B, K - 1, I - 2 O)
        feeding back the prediction: ``training.rollout``'s encode and continue_rollout in
        one call. Predictions are clipped to ``bounds`` (lo, hi), each (O,), when given; with
        ``residual`` the head's output is added to the state part of its input. Returns
        (B, K, O)."""
        k, o = self.kernels, self.outputs
        if x.dim() != 3 or x.shape[2] != self.input_width or x.shape[1] < 1:
            raise ValueError(
                f"native CfC forecast: x must be (B, T >= 1, {self.input_width}), "
                f"got {tuple(x.shape)}"
            )
        batch, seq_len, width = x.shape
        n_iv = width - 2 * o
        if n_iv < 0 or future.dim() != 3 or future.shape[0] != batch or future.shape[2] != n_iv:
            raise ValueError(
                f"native CfC forecast: future must be ({batch}, K - 1, {n_iv}), "
                f"got {tuple(future.shape)}"
            )
        if lengths.dtype != torch.int64 or not lengths.is_contiguous():
            raise ValueError(
                f"native CfC forecast: lengths must be contiguous int64, got {lengths.dtype}"
            )
        _check_shapes((lengths, (batch,)))
        if batch and (int(lengths.min()) < 1 or int(lengths.max()) > seq_len):
            raise ValueError(f"native CfC forecast: lengths must lie in 1..{seq_len}")
        if bounds is None:
            lo = x.new_full((o,), -float("inf"))
            hi = x.new_full((o,), float("inf"))
        else:
            lo, hi = bounds
            _check_shapes((lo, hi, (o,)))
        horizon = future.shape[1] + 1
        pred = x.new_empty(batch, horizon, o)
        layers, n = len(self._b0), self.hidden
        work = x.new_empty(batch * (2 * layers * n + o + width + self._scratch_width))
        ptrs = _pointers(k.dtype, x, future, lo, hi, pred, work)
        k._stack_forecast(
            batch, seq_len, horizon, layers, width, self.backbone, n, o, int(self.lerp),
            int(residual), ptrs[0], lengths.data_ptr(), *ptrs[1:4], self._xh_wt, self._b0,
            self._head_wt, self._head_b, *self._out, *ptrs[4:], k._gemm,
        )  # fmt: skip
        return pred


def _check(kernels: Kernels) -> None:
    """Runs both loops on a small problem against the same loops written with torch ops."""
    # The first use may come from inside an autograd Function's forward or an inference-mode
    # block, where the reference below could not record its graph.
    with torch.inference_mode(False), torch.enable_grad():
        _compare_with_torch(kernels)


def _compare_with_torch(kernels: Kernels) -> None:
    g = torch.Generator().manual_seed(0)
    dt = kernels.dtype
    seq_len, batch, width, n = 3, 5, 7, 4

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=dt)

    pre, h0, hw = rand(seq_len, batch, width), rand(batch, n), rand(width, n)
    head_w, head_b, d_hs = rand(3 * n, width), rand(3 * n), rand(seq_len, batch, n)
    for lerp in (True, False):
        acts = torch.empty(seq_len, batch, width, dtype=dt)
        probs = torch.empty(seq_len, batch, 3 * n, dtype=dt)
        hs = torch.empty(seq_len, batch, n, dtype=dt)
        kernels.forward(lerp, pre, h0, hw, head_w, head_b, acts, probs, hs)
        d_heads, d_pre = torch.empty_like(probs), torch.empty_like(acts)
        dh0, scratch = torch.empty_like(h0), torch.empty(batch, width, dtype=dt)
        kernels.backward(lerp, d_hs, acts, probs, hw, head_w, d_heads, d_pre, dh0, scratch)

        pre_r, h0_r = pre.clone().requires_grad_(), h0.clone().requires_grad_()
        h, outs = h0_r, []
        for t in range(seq_len):
            a = torch.sigmoid(pre_r[t] + h @ hw.t())
            p1, p2, gate = torch.sigmoid(a @ head_w.t() + head_b).split(n, dim=1)
            h = 2 * torch.lerp(p1, p2, gate) - 1 if lerp else 2 * p1 - 1 + gate * (2 * p2 - 1)
            outs.append(h)
        ref = torch.stack(outs)
        ref_pre, ref_h0 = torch.autograd.grad(ref, (pre_r, h0_r), d_hs)
        tol = 1e-4 if dt == torch.float32 else 1e-10
        for name, got, want in (("hs", hs, ref), ("d_pre", d_pre, ref_pre), ("dh0", dh0, ref_h0)):
            if not torch.allclose(got, want.detach(), rtol=tol, atol=tol):
                err = (got - want).abs().max().item()
                raise KernelError(f"{kernels.path.name}: {name} differs from torch by {err:.3g}")

        _compare_stack_with_torch(kernels, lerp, rand, tol)


def _compare_stack_with_torch(kernels: Kernels, lerp: bool, rand, tol: float) -> None:  # noqa: ANN001
    """The stack's one step and whole forecast against the same arithmetic in torch ops."""
    batch, width, n, inputs, outputs = 5, 7, 4, 5, 2  # inputs: state, its mask, 1 intervention
    layers = [
        (rand(k + n, width), rand(width), rand(width, 3 * n), rand(3 * n)) for k in (inputs, n)
    ]
    out_wt, out_b = rand(n, outputs), rand(outputs)
    stack = StackWeights(kernels, lerp, layers, out_wt, out_b)

    def step(x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        h, new = x, []
        for (xh_wt, b0, head_wt, head_b), h_old in zip(layers, state, strict=True):
            a = torch.sigmoid(torch.cat([h, h_old], 1) @ xh_wt + b0)
            p1, p2, gate = torch.sigmoid(a @ head_wt + head_b).split(n, dim=1)
            h = 2 * torch.lerp(p1, p2, gate) - 1 if lerp else 2 * p1 - 1 + gate * (2 * p2 - 1)
            new.append(h)
        return h @ out_wt + out_b, new

    def compare(name: str, got: Tensor, ref: Tensor) -> None:
        if not torch.allclose(got, ref, rtol=tol, atol=tol):
            err = (got - ref).abs().max().item()
            raise KernelError(f"{kernels.path.name}: {name} differs from torch by {err:.3g}")

    # One step; x a strided time slice, as in rollouts.
    xs = rand(batch, 3, inputs)
    state = [rand(batch, n), rand(batch, n)]
    out, new = stack.step(xs[:, 1], state)
    want_out, want_new = step(xs[:, 1], state)
    compare("stack output", out, want_out)
    compare("stack state", torch.stack(new), torch.stack(want_new))

    # A forecast: histories of 1 to 3 bins, two fed-back steps, residual, clipped.
    lengths = torch.tensor([3, 1, 2, 3, 1])
    future = rand(batch, 2, inputs - 2 * outputs)
    lo = rand(outputs) - 0.5
    hi = lo + 1.0
    state = [xs.new_zeros(batch, n), xs.new_zeros(batch, n)]
    first = xs.new_empty(batch, outputs)
    for t in range(xs.shape[1]):
        y, new = step(xs[:, t], state)
        live = (t < lengths)[:, None]
        state = [torch.where(live, a, b) for a, b in zip(new, state, strict=True)]
        last = t == lengths - 1
        first[last] = (y + xs[:, t, :outputs])[last]
    preds = [torch.clamp(first, lo, hi)]
    for k in range(future.shape[1]):
        x = torch.cat([preds[-1], torch.zeros_like(first), future[:, k]], 1)
        y, state = step(x, state)
        preds.append(torch.clamp(y + preds[-1], lo, hi))
    got = stack.forecast(xs, lengths, future, (lo, hi), residual=True)
    compare("stack forecast", got, torch.stack(preds, 1))


def for_dtype(dtype: torch.dtype) -> Kernels | None:
    """The verified loops for ``dtype``, or None (disabled, unsupported, or failed to build)."""
    if dtype not in _VARIANTS or not enabled():
        return None
    try:
        return _loaded[dtype]
    except KeyError:
        pass
    with _lock:
        if dtype not in _loaded:
            try:
                kernels = Kernels(dtype)
                _check(kernels)
            except (KernelError, OSError, subprocess.SubprocessError) as exc:
                log.warning("FastCfC runs its Python loops (native loops unavailable: %s)", exc)
                kernels = None
            _loaded[dtype] = kernels
    return _loaded[dtype]


if __name__ == "__main__":  # build, verify and report: python -m training.cfc_kernels
    logging.basicConfig(level=logging.INFO)
    for dtype in _VARIANTS:
        k = for_dtype(dtype)
        print(f"{dtype}: {k.path if k else 'unavailable'}")
    sys.exit(0 if all(for_dtype(d) for d in _VARIANTS) else 1)
