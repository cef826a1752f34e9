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

__all__ = ["KernelError", "Kernels", "for_dtype"]

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
