"""A faster drop-in replacement for ``ncps.torch.CfC`` (ncps 1.0.1).

``FastCfC`` subclasses ``ncps.torch.CfC``: the constructor, the parameters, their
initialisation and the state-dict keys are ncps' own, so a state dict moves between the two
unchanged. Only ``forward`` is rewritten; it computes the same function, faster:

* the parts of the per-step Linear layers that act on the inputs (the backbone's first Linear
  acts on ``cat([x_t, h])``; the mixed-memory LSTM's ``input_map``) are applied to all time
  steps in one matrix product before the loop, leaving one small ``h @ W_h`` per step;
* ``ff1``, ``ff2``, ``time_a`` and ``time_b`` run as one matmul per step; with the default
  elapsed time of 1.0, ``time_a(x) * 1 + time_b(x)`` is one head with summed weights;
* for the plain (unwired) cell, backpropagation through time is written out by hand
  (``_FusedSequence``): the loop only carries the recurrent chain, the weight gradients of all
  steps are a few large matrix products after it, and no autograd graph is built per step;
* per-sample and per-step ``timespans`` of shape (B, T) or (B, T, 1) broadcast per sample
  (ncps 1.0.1 squeezes them to (B,), which fails for B > 1 unless B equals the number of
  units, where it silently broadcasts over units instead).

Wired (NCP) cells, dropout in training mode, and timespans that require a gradient take the
autograd path (same precomputation and fused heads, per-step autograd graph).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from ncps.torch import CfC
from ncps.torch.cfc_cell import CfCCell, LeCun
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from training import cfc_kernels

__all__ = ["FastCfC", "StackStepper"]


def _lecun_tanh(x: Tensor) -> Tensor:
    # Same operation order as ncps' LeCun module, so results agree to the last bits.
    return 1.7159 * torch.tanh(0.666 * x)


def _activation_fn(module: nn.Module):
    """The functional form of one of ncps' backbone activations (skips module-call overhead)."""
    if isinstance(module, LeCun):
        return _lecun_tanh
    if isinstance(module, nn.SiLU):
        return F.silu
    if isinstance(module, nn.ReLU):
        return F.relu
    if isinstance(module, nn.Tanh):
        return torch.tanh
    if isinstance(module, nn.GELU):
        return F.gelu
    raise TypeError(f"unsupported backbone activation {type(module).__name__}")


def _activation_grad(act, u: Tensor) -> Tensor:
    """d act(u) / du elementwise, as autograd defines it (all backbone activations are
    elementwise, so one vector-Jacobian product with ones gives the derivative)."""
    with torch.enable_grad():
        u = u.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(act(u), u, torch.ones_like(u))
    return grad


@dataclass
class _Layer:
    """A backbone Linear after the first one."""

    weight: Tensor
    bias: Tensor
    act: object
    dropout: float


class _CellWeights:
    """One CfC cell (a plain cell or one layer of a wired cell) prepared for a sequence.

    The cell's first Linear acts on ``cat([x, h])``; it is split into the input part
    (``x_weight``, ``x_bias``: applied to all steps at once) and the recurrent part
    (``h_weight``). Without a backbone the first Linear is the fused heads themselves.
    """

    def __init__(self, cell: CfCCell, in_features: int, fuse_time: bool) -> None:
        self.mode = cell.mode
        self.hidden = cell.hidden_size
        self.fuse_time = fuse_time
        mask = cell.sparsity_mask
        ff1_w = cell.ff1.weight if mask is None else cell.ff1.weight * mask
        if self.mode == "pure":
            head_w, head_b = ff1_w, cell.ff1.bias
            self.w_tau_abs = torch.abs(cell.w_tau)
            self.A = cell.A
        else:
            ff2_w = cell.ff2.weight if mask is None else cell.ff2.weight * mask
            ta, tb = cell.time_a, cell.time_b
            if fuse_time:
                # ts == 1: time_a(x) * 1 + time_b(x) == (W_a + W_b) x + (b_a + b_b).
                head_w = torch.cat([ff1_w, ff2_w, ta.weight + tb.weight])
                head_b = torch.cat([cell.ff1.bias, cell.ff2.bias, ta.bias + tb.bias])
            else:
                head_w = torch.cat([ff1_w, ff2_w, ta.weight, tb.weight])
                head_b = torch.cat([cell.ff1.bias, cell.ff2.bias, ta.bias, tb.bias])
            self.w_tau_abs = self.A = None
        self.n_heads = head_w.shape[0] // self.hidden

        self.layers: list[_Layer] = []
        if cell.backbone_layers > 0:
            modules = list(cell.backbone)
            first = modules[0]
            self.x_weight, self.x_bias = first.weight[:, :in_features], first.bias
            self.h_weight = first.weight[:, in_features:]
            self.act0 = _activation_fn(modules[1])
            i = 2
            while i < len(modules):
                lin, act = modules[i], modules[i + 1]
                i += 2
                p = 0.0
                if i < len(modules) and isinstance(modules[i], nn.Dropout):
                    p = modules[i].p
                    i += 1
                self.layers.append(_Layer(lin.weight, lin.bias, _activation_fn(act), p))
            self.head_w, self.head_b = head_w, head_b
            self.has_backbone = True
        else:
            self.x_weight, self.x_bias = head_w[:, :in_features], head_b
            self.h_weight = head_w[:, in_features:]
            self.act0 = None
            self.head_w = self.head_b = None
            self.has_backbone = False

    def x_part(self, x: Tensor) -> Tensor:
        return F.linear(x, self.x_weight, self.x_bias)

    def step(self, pre: Tensor, h: Tensor, ts: Tensor | None, training: bool) -> Tensor:
        """One step with autograd (the general path)."""
        z = torch.addmm(pre, h, self.h_weight.t())
        if self.has_backbone:
            z = self.act0(z)
            for layer in self.layers:
                z = layer.act(F.linear(z, layer.weight, layer.bias))
                if layer.dropout > 0.0:
                    z = F.dropout(z, layer.dropout, training)
            z = F.linear(z, self.head_w, self.head_b)
        n = self.hidden
        if self.mode == "pure":
            t = 1.0 if ts is None else ts
            return -self.A * torch.exp(-t * (self.w_tau_abs + torch.abs(z))) * z + self.A
        # split rather than slicing: split's backward concatenates the pieces' gradients,
        # slicing's zero-fills a full-size gradient for every slice.
        if self.fuse_time:
            ff, t_ab = z.split([2 * n, n], dim=1)
            gate = torch.sigmoid(t_ab)
        else:
            ff, t_a, t_b = z.split([2 * n, n, n], dim=1)
            gate = torch.sigmoid(t_a + t_b if ts is None else torch.addcmul(t_b, t_a, ts))
        ff1, ff2 = torch.tanh(ff).split(n, dim=1)
        if self.mode == "no_gate":
            return torch.addcmul(ff1, gate, ff2)
        return torch.lerp(ff1, ff2, gate)


def _sigmoid_form(module: nn.Module) -> tuple[float, float, float] | None:
    """(alpha, beta, gamma) with act(u) == alpha * sigmoid(beta * u) + gamma, if there is one.

    torch's CPU tanh is several times slower than its sigmoid, and the affine parts fold into
    the neighbouring Linear layers, so the fused path evaluates tanh-like units as sigmoids.
    """
    if isinstance(module, LeCun):
        return (2 * 1.7159, 2 * 0.666, -1.7159)
    if isinstance(module, nn.Tanh):
        return (2.0, 2.0, -1.0)
    return None


def _absorb(weight: Tensor, bias: Tensor, form) -> tuple[Tensor, Tensor]:
    """A Linear acting on ``alpha * s + gamma`` rewritten to act on ``s``."""
    if form is None:
        return weight, bias
    alpha, _, gamma = form
    return alpha * weight, bias + gamma * weight.sum(1)


class _BufferPool:
    """Reuses the large per-sequence work buffers of ``_FusedSequence``.

    Freshly allocated multi-megabyte tensors cost page faults on first touch (glibc returns
    large freed blocks to the OS), which took about as long as the arithmetic here. A buffer
    comes back only once nothing can read it any more: forward buffers when the autograd node
    that saved them is freed (after backward, or when the graph is dropped), backward
    temporaries at the end of backward. Shapes vary with the padded sequence length, so the
    pool keeps at most ``max_bytes`` and drops the least recently returned buffers first.
    """

    def __init__(self, max_bytes: int = 64 * 2**20) -> None:
        self._free: OrderedDict[int, tuple[tuple, Tensor]] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    @staticmethod
    def _key(t: Tensor) -> tuple:
        return (tuple(t.shape), t.dtype, t.device)

    def take(self, like: Tensor, *shape: int) -> Tensor:
        key = (shape, like.dtype, like.device)
        with self._lock:
            for ident, (k, t) in reversed(self._free.items()):
                if k == key:
                    del self._free[ident]
                    self._bytes -= t.numel() * t.element_size()
                    return t
        return like.new_empty(shape)

    def give(self, tensors) -> None:
        with self._lock:
            for t in tensors:
                if t is None or id(t) in self._free:
                    continue
                self._free[id(t)] = (self._key(t), t)
                self._bytes += t.numel() * t.element_size()
            while self._bytes > self._max_bytes and self._free:
                _, (_, old) = self._free.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()


_POOL = _BufferPool()

# The specialised loops of ``_FusedSequence`` for the common layout; False runs the general
# loops instead (for tests and speed comparisons).
_SPECIALISED_LOOPS = True
# The common layout runs ``cfc_kernels``' compiled loops where they built; False keeps the
# Python loops (for tests and speed comparisons).
_NATIVE_LOOPS = True


class _Release:
    """Gives its buffers back to the pool when the autograd node holding it is freed."""

    def __init__(self, tensors: list) -> None:
        self.tensors = tensors

    def __del__(self) -> None:
        _POOL.give(self.tensors)


@dataclass(frozen=True)
class _Spec:
    """Static description of the sequence computed by ``_FusedSequence``."""

    mode: str
    hidden: int
    mixed: bool
    has_backbone: bool
    # Per backbone Linear: "sigmoid" (weights already rescaled) or an elementwise activation.
    acts: tuple


class _FusedSequence(torch.autograd.Function):
    """A whole CfC sequence (plain cell, optional mixed-memory LSTM) with hand-written BPTT.

    Inputs are time-major and already rewritten by ``FastCfC._fused`` (sigmoid forms, fused
    heads): ``pre`` (T, B, Z0) is the input part of the first Linear for all steps,
    ``lstm_pre`` (T, B, 4H) the LSTM's input map, ``ts`` (T, B, 1) or None. Default and
    no_gate heads are ``[2 ff1, 2 ff2, gate logits]`` (or ``[.., time_a, time_b]`` with ts),
    so ``tanh(ff) = 2 sigmoid(2 ff) - 1`` needs one sigmoid over all heads; the LSTM's input
    activation rows are doubled likewise. Returns the hidden states (T, B, H) and the final
    LSTM cell state (an empty tensor without mixed memory).
    """

    @staticmethod
    def forward(ctx, spec: _Spec, pre, h0, c0, ts, h_weight, lstm_pre, lstm_weight, head_w,
                head_b, w_tau_abs, amp, *layer_params):  # fmt: skip
        seq_len, batch = pre.shape[0], pre.shape[1]
        n = spec.hidden
        pool: list[Tensor] = []

        def new(*shape: int) -> Tensor:
            buf = _POOL.take(pre, *shape)
            pool.append(buf)
            return buf

        pure = spec.mode == "pure"
        layer_w, layer_b = layer_params[0::2], layer_params[1::2]
        widths = [pre.shape[2], *(w.shape[0] for w in layer_w)] if spec.has_backbone else []
        acts = [new(seq_len, batch, z) for z in widths]
        pre_acts = [
            None if act == "sigmoid" else new(seq_len, batch, z)
            for act, z in zip(spec.acts, widths, strict=True)
        ]
        # The common layout (one sigmoid-form backbone Linear, default or no_gate heads, no
        # elapsed times, no LSTM) takes a loop specialised for it: fewer Python-level
        # operations per step, and the heads go straight into ``probs``.
        simple = _SPECIALISED_LOOPS and (
            not pure and not spec.mixed and ts is None and spec.has_backbone
            and spec.acts == ("sigmoid",)
        )  # fmt: skip
        heads = None if simple else new(
            seq_len, batch, head_w.shape[0] if spec.has_backbone else pre.shape[2]
        )  # fmt: skip
        hs = pre.new_empty(seq_len, batch, n)  # returned: never pooled
        if pure:
            expo = new(seq_len, batch, n)
        else:
            probs = new(seq_len, batch, 3 * n)
        if spec.mixed:
            l_probs = new(seq_len, batch, 4 * n)
            l_act = new(seq_len, batch, n)
            cs = new(seq_len, batch, n)
            tanh_cs = new(seq_len, batch, n)
            h_in = new(seq_len, batch, n)
            lstm_wt = lstm_weight.t()
        h_wt = h_weight.t()
        weights_t = [w.t() for w in layer_w]
        if spec.has_backbone:
            weights_t.append(head_w.t())
            biases = [*layer_b, head_b]

        h, c = h0, c0
        kernels = _native_loops(pre) if simple else None
        if kernels is not None:
            kernels.forward(
                spec.mode != "no_gate", pre.contiguous(), h0.contiguous(),
                h_weight.contiguous(), head_w.contiguous(), head_b.contiguous(), acts[0], probs, hs,
            )  # fmt: skip
        elif simple:
            p1s, p2s, gs = (part.unbind(0) for part in probs.split(n, dim=2))
            hw_t, head_wt = h_wt, weights_t[-1]
            lerp = spec.mode != "no_gate"
            for pre_t, act_t, prob_t, h_t, p1, p2, g in zip(
                pre.unbind(0), acts[0].unbind(0), probs.unbind(0), hs.unbind(0), p1s, p2s, gs,
                strict=True,
            ):  # fmt: skip
                z = torch.addmm(pre_t, h, hw_t, out=act_t).sigmoid_()
                torch.addmm(head_b, z, head_wt, out=prob_t).sigmoid_()
                if lerp:
                    h = torch.lerp(p1, p2, g, out=h_t).mul_(2.0).sub_(1.0)
                else:
                    h = torch.addcmul(p1, g, p2, out=h_t).mul_(2.0).sub_(g).sub_(1.0)
        for t in range(0 if simple else seq_len):
            if spec.mixed:
                p = torch.addmm(lstm_pre[t], h, lstm_wt, out=l_probs[t]).sigmoid_()
                p_in, in_gate, forget_gate, out_gate = p.split(n, dim=1)
                act = torch.mul(p_in, 2.0, out=l_act[t]).sub_(1.0)
                c = torch.mul(c, forget_gate, out=cs[t]).addcmul_(act, in_gate)
                tc = torch.mul(c, 2.0, out=tanh_cs[t]).sigmoid_().mul_(2.0).sub_(1.0)
                h = torch.mul(tc, out_gate, out=h_in[t])
            if spec.has_backbone:
                z = pre[t]
                for k, act in enumerate(spec.acts):
                    mat = h if k == 0 else z
                    wt = h_wt if k == 0 else weights_t[k - 1]
                    if act == "sigmoid":
                        z = torch.addmm(z if k == 0 else biases[k - 1], mat, wt, out=acts[k][t])
                        z.sigmoid_()
                    else:
                        u = torch.addmm(z if k == 0 else biases[k - 1], mat, wt, out=pre_acts[k][t])
                        z = acts[k][t]
                        z.copy_(act(u))
                z = torch.addmm(head_b, z, weights_t[-1], out=heads[t])
            else:
                z = torch.addmm(pre[t], h, h_wt, out=heads[t])
            if pure:
                e = torch.abs(z, out=expo[t]).add_(w_tau_abs)
                if ts is not None:
                    e.mul_(ts[t])
                e.neg_().exp_()
                # ncps: -A * e * z + A
                torch.mul(e, z, out=hs[t]).mul_(-amp).add_(amp)
            else:
                if ts is not None:
                    z[:, 2 * n : 3 * n].mul_(ts[t]).add_(z[:, 3 * n :])
                p1, p2, g = torch.sigmoid(z[:, : 3 * n], out=probs[t]).split(n, dim=1)
                if spec.mode == "no_gate":
                    # (2 p1 - 1) + g (2 p2 - 1)
                    torch.addcmul(p1, g, p2, out=hs[t]).mul_(2.0).sub_(g).sub_(1.0)
                else:
                    # lerp(2 p1 - 1, 2 p2 - 1, g)
                    torch.lerp(p1, p2, g, out=hs[t]).mul_(2.0).sub_(1.0)
            h = hs[t]

        c_last = cs[-1].clone() if spec.mixed else pre.new_empty(0)
        if not spec.mixed:
            ctx.mark_non_differentiable(c_last)
        ctx.spec = spec
        ctx.kernels = kernels
        ctx.save_for_backward(h0, c0, ts, h_weight, lstm_weight, head_w, w_tau_abs, amp, hs,
                              *layer_w)  # fmt: skip
        ctx.acts, ctx.pre_acts, ctx.heads = acts, pre_acts, heads
        ctx.expo = expo if pure else None
        ctx.probs = None if pure else probs
        if spec.mixed:
            ctx.lstm = (l_probs, l_act, cs, tanh_cs, h_in)
        ctx.release = _Release(pool)
        return hs, c_last

    @staticmethod
    @once_differentiable
    def backward(ctx, d_hs, d_c_last):
        spec: _Spec = ctx.spec
        h0, c0, ts, h_weight, lstm_weight, head_w, w_tau_abs, amp, hs, *layer_w = ctx.saved_tensors
        if ctx.kernels is not None:
            return _native_backward(ctx, d_hs, h0, h_weight, head_w, hs)
        seq_len, batch, n = hs.shape
        pure = spec.mode == "pure"

        scratch: list[Tensor] = []

        def take(*shape: int) -> Tensor:
            buf = _POOL.take(hs, *shape)
            scratch.append(buf)
            return buf

        # One backbone Linear, no LSTM (the common layout): a loop with fewer Python-level
        # operations per step; the recurrent gradient is accumulated straight into the
        # previous step's total with addmm_.
        simple = _SPECIALISED_LOOPS and spec.has_backbone and not spec.mixed and len(spec.acts) == 1
        # d heads / d h for all steps at once, in place in pooled buffers.
        if pure:
            expo, z = ctx.expo, ctx.heads
            factor = take(seq_len, batch, 1, n)
            f = factor[:, :, 0]
            torch.abs(z, out=f)
            if ts is not None:
                f.mul_(ts)
            f.neg_().add_(1.0).mul_(expo).mul_(-amp)  # -A e (1 - t |z|)
        else:
            p1, p2, g = ctx.probs.split(n, dim=2)
            n_heads = 3 if ts is None else 4
            factor = take(seq_len, batch, n_heads, n)
            k = factor.unbind(2)
            # sigmoid_backward(d, s) = d s (1 - s) in one pass over the sequence.
            sig_bw = torch.ops.aten.sigmoid_backward.grad_input
            d_q = k[2] if ts is None else k[3]
            if spec.mode == "no_gate":
                torch.mul(p2, 2.0, out=d_q).sub_(1.0)
                sig_bw(d_q, g, grad_input=d_q)  # (2 p2 - 1) g (1 - g)
            else:
                torch.sub(p2, p1, out=d_q).mul_(2.0)
                sig_bw(d_q, g, grad_input=d_q)  # 2 (p2 - p1) g (1 - g)
            if ts is not None:
                torch.mul(d_q, ts, out=k[2])
            sig_bw(torch.add(g, g, out=k[1]), p2, grad_input=k[1])  # 2 g p2 (1 - p2)
            if spec.mode == "no_gate":
                sig_bw(k[0].fill_(2.0), p1, grad_input=k[0])  # 2 p1 (1 - p1)
            else:
                torch.mul(g, -2.0, out=k[0]).add_(2.0)
                sig_bw(k[0], p1, grad_input=k[0])  # 2 (1 - g) p1 (1 - p1)
        n_heads = factor.shape[2]
        if spec.has_backbone:
            d_heads = take(seq_len, batch, n_heads * n)
            d_act = []
            for act, a, u in zip(spec.acts, ctx.acts, ctx.pre_acts, strict=True):
                if simple and act == "sigmoid":
                    d_act.append(None)  # the loop below applies sigmoid_backward per step
                elif act == "sigmoid":
                    d = take(*a.shape)
                    torch.mul(a, a, out=d)
                    d_act.append(torch.sub(a, d, out=d))
                else:
                    d_act.append(_activation_grad(act, u))
            # The first one is returned as the gradient of ``pre``: not pooled.
            d_pre_acts = [torch.empty_like(ctx.acts[0])]
            d_pre_acts += [take(*a.shape) for a in ctx.acts[1:]]
            d_first = d_pre_acts[0]
        else:
            d_heads = d_first = hs.new_empty(seq_len, batch, n_heads * n)
        if spec.mixed:
            l_probs, l_act, cs, tanh_cs, h_in = ctx.lstm
            p_in, in_gate, forget_gate, out_gate = l_probs.split(n, dim=2)
            c_prev = torch.cat([c0.unsqueeze(0), cs[:-1]])
            sig_grad = l_probs * (1.0 - l_probs)
            _, ig_grad, fg_grad, og_grad = sig_grad.split(n, dim=2)
            dc_from_h = out_gate * (1.0 - tanh_cs * tanh_cs)
            d_lstm_c = torch.stack(
                [2.0 * in_gate * sig_grad[..., :n], l_act * ig_grad, c_prev * fg_grad], dim=2
            )
            d_lstm_o = tanh_cs * og_grad
            d_lstm = hs.new_empty(seq_len, batch, 4 * n)
            dc = d_c_last.clone() if d_c_last.numel() else torch.zeros_like(c0)

        # Becomes d loss / d hs[t] including the recurrent path.
        d_h_total = take(*d_hs.shape).copy_(d_hs)
        dh_next = None
        if simple:
            dh_steps = d_h_total.unbind(0)
            da = take(batch, head_w.shape[1])
            sig = spec.acts[0] == "sigmoid"
            sig_bw = torch.ops.aten.sigmoid_backward.grad_input
            for t, fac, d_head, d_head_v, d_a, d_u in zip(
                range(seq_len - 1, -1, -1),
                factor.unbind(0)[::-1],
                d_heads.unbind(0)[::-1],
                d_heads.view(seq_len, batch, n_heads, n).unbind(0)[::-1],
                (ctx.acts[0] if sig else d_act[0]).unbind(0)[::-1],
                d_first.unbind(0)[::-1],
                strict=True,
            ):
                torch.mul(dh_steps[t].unsqueeze(1), fac, out=d_head_v)
                torch.mm(d_head, head_w, out=da)
                if sig:  # d_a holds the sigmoid's output here
                    sig_bw(da, d_a, grad_input=d_u)
                else:
                    torch.mul(da, d_a, out=d_u)
                if t > 0:
                    dh_steps[t - 1].addmm_(d_u, h_weight)
                else:
                    dh_next = d_u @ h_weight
        for t in range(-1 if simple else seq_len - 1, -1, -1):
            dh = d_h_total[t]
            if dh_next is not None:
                dh.add_(dh_next)
            torch.mul(dh.unsqueeze(1), factor[t], out=d_heads[t].view(batch, n_heads, n))
            if spec.has_backbone:
                da = d_heads[t] @ head_w
                for k in range(len(spec.acts) - 1, -1, -1):
                    du = torch.mul(da, d_act[k][t], out=d_pre_acts[k][t])
                    if k > 0:
                        da = du @ layer_w[k - 1]
            d_in = d_first[t] @ h_weight
            if spec.mixed:
                dc.addcmul_(d_in, dc_from_h[t])
                torch.mul(dc.unsqueeze(1), d_lstm_c[t], out=d_lstm[t, :, : 3 * n].view(batch, 3, n))
                torch.mul(d_in, d_lstm_o[t], out=d_lstm[t, :, 3 * n :])
                dc.mul_(forget_gate[t])
                dh_next = d_lstm[t] @ lstm_weight
            else:
                dh_next = d_in

        def flat(x: Tensor) -> Tensor:
            return x.reshape(-1, x.shape[-1])

        h_prev = take(*hs.shape)
        h_prev[0].copy_(h0)
        h_prev[1:].copy_(hs[:-1])
        need = ctx.needs_input_grad
        # Inputs: spec, pre, h0, c0, ts, h_weight, lstm_pre, lstm_weight, head_w, head_b,
        # w_tau_abs, amp, *layer_params.
        grads: list[Tensor | None] = [None] * (12 + 2 * len(layer_w))
        grads[1] = d_first if need[1] else None
        grads[2] = dh_next if need[2] else None
        h_in = h_prev
        if spec.mixed:
            h_in = ctx.lstm[4]
            grads[3] = dc if need[3] else None
            grads[6] = d_lstm if need[6] else None
            if need[7]:
                grads[7] = flat(d_lstm).t() @ flat(h_prev)
        if need[5]:
            grads[5] = flat(d_first).t() @ flat(h_in)
        if spec.has_backbone:
            if need[8]:
                grads[8] = flat(d_heads).t() @ flat(ctx.acts[-1])
            if need[9]:
                grads[9] = d_heads.sum((0, 1))
            for k in range(len(layer_w)):
                grads[12 + 2 * k] = flat(d_pre_acts[k + 1]).t() @ flat(ctx.acts[k])
                grads[13 + 2 * k] = d_pre_acts[k + 1].sum((0, 1))
        if pure:
            t = 1.0 if ts is None else ts
            if need[11]:
                grads[11] = (d_h_total * (1.0 - expo * z)).sum((0, 1)).unsqueeze(0)
            if need[10]:
                grads[10] = (d_h_total * amp * z * expo * t).sum((0, 1)).unsqueeze(0)
        _POOL.give(scratch)
        return tuple(grads)


def _native_loops(like: Tensor):
    """``cfc_kernels``' compiled loops for tensors like ``like``, when they can run them."""
    if like.device.type != "cpu" or not _NATIVE_LOOPS:
        return None
    return cfc_kernels.for_dtype(like.dtype)


def _native_backward(ctx, d_hs: Tensor, h0: Tensor, h_weight: Tensor, head_w: Tensor, hs: Tensor):
    """``_FusedSequence.backward`` for a forward pass that ran the compiled loops."""
    seq_len, batch, n = hs.shape
    acts, probs, kernels = ctx.acts[0], ctx.probs, ctx.kernels
    d_first = torch.empty_like(acts)  # returned as the gradient of ``pre``: not pooled
    d_heads = _POOL.take(hs, seq_len, batch, probs.shape[2])
    scratch = _POOL.take(hs, batch, acts.shape[2])
    dh0 = torch.empty_like(hs[0])
    kernels.backward(
        ctx.spec.mode != "no_gate", d_hs.contiguous(), acts, probs, h_weight.contiguous(),
        head_w.contiguous(), d_heads, d_first, dh0, scratch,
    )  # fmt: skip
    need = ctx.needs_input_grad
    grads: list[Tensor | None] = [None] * 12
    grads[1] = d_first if need[1] else None
    grads[2] = dh0 if need[2] else None
    if need[5]:
        # Step t's recurrent product read hs[t - 1] (h0 at t = 0): two products instead of
        # copying the shifted states into one buffer.
        flat_d = d_first.view(seq_len * batch, -1)
        grad = flat_d[batch:].t() @ hs[:-1].reshape(-1, n)
        grads[5] = grad.addmm_(d_first[0].t(), h0)
    if need[8]:
        grads[8] = d_heads.view(seq_len * batch, -1).t() @ acts.view(seq_len * batch, -1)
    if need[9]:
        grads[9] = d_heads.sum((0, 1))
    _POOL.give([d_heads, scratch])
    return tuple(grads)


def _infer_sequence(spec: _Spec, pre, h, c, ts, h_weight, lstm_pre, lstm_weight, head_w, head_b,
                    w_tau_abs, amp, *layer_params):  # fmt: skip
    """``_FusedSequence.forward`` without autograd: same arithmetic, nothing kept."""
    n = spec.hidden
    h_wt = h_weight.t()
    layer_wt = [w.t() for w in layer_params[0::2]]
    layer_b = layer_params[1::2]
    outs = []
    for t in range(pre.shape[0]):
        if spec.mixed:
            p_in, in_gate, forget_gate, out_gate = (
                torch.addmm(lstm_pre[t], h, lstm_weight.t()).sigmoid_().split(n, dim=1)
            )
            c = torch.addcmul(c * forget_gate, p_in.mul(2.0).sub_(1.0), in_gate)
            h = torch.mul(c, 2.0).sigmoid_().mul_(2.0).sub_(1.0).mul_(out_gate)
        z = torch.addmm(pre[t], h, h_wt)
        if spec.has_backbone:
            for k, act in enumerate(spec.acts):
                if k > 0:
                    z = torch.addmm(layer_b[k - 1], z, layer_wt[k - 1])
                z = z.sigmoid_() if act == "sigmoid" else act(z)
            z = torch.addmm(head_b, z, head_w.t())
        if spec.mode == "pure":
            e = torch.abs(z).add_(w_tau_abs)
            if ts is not None:
                e.mul_(ts[t])
            h = e.neg_().exp_().mul_(z).mul_(-amp).add_(amp)
        else:
            if ts is not None:
                z[:, 2 * n : 3 * n].mul_(ts[t]).add_(z[:, 3 * n :])
            p1, p2, g = torch.sigmoid(z[:, : 3 * n]).split(n, dim=1)
            if spec.mode == "no_gate":
                h = torch.addcmul(p1, g, p2).mul_(2.0).sub_(g).sub_(1.0)
            else:
                h = torch.lerp(p1, p2, g).mul_(2.0).sub_(1.0)
        outs.append(h)
    hs = outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)
    return hs, (c if spec.mixed else None)


class FastCfC(CfC):
    """``ncps.torch.CfC`` with a faster ``forward`` computing the same function.

    Takes exactly ncps' constructor arguments and has ncps' parameters and state-dict keys.
    ``forward(input, hx=None, timespans=None)`` returns ``(output, hx)`` like ncps.
    ``timespans`` may be ``None`` (elapsed time 1.0 per step, ncps' default), a number, or a
    tensor of shape (B, T) / (B, T, 1) (batch-first), (T, B) / (T, B, 1) (time-first), or
    (T,) / (T, 1) for unbatched input: one elapsed time per sample and step.

    Set ``fused = False`` on an instance to force the autograd path (for comparisons).
    """

    fused: bool = True

    def forward(self, input: Tensor, hx=None, timespans=None):  # noqa: A002 - ncps' name
        if input.dim() not in (2, 3):
            raise ValueError(f"input must be 2-D (L, C) or 3-D, got shape {tuple(input.shape)}")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        # Time-major inside: each step reads one (B, C) slab.
        x = input.transpose(0, 1) if self.batch_first else input
        seq_len, batch_size = x.shape[0], x.shape[1]
        ts = self._timespans(timespans, seq_len, batch_size, is_batched, x)
        h, c = self._initial_state(hx, batch_size, is_batched, x)

        if self._use_fused(ts):
            hs, c = self._fused(x, h, c, ts)
            h = h_out = hs[-1]
            outputs = hs
        else:
            outputs, h_out, h, c = self._loop(x, h, c, ts)

        if self.return_sequences:
            readout = self.fc(outputs.transpose(0, 1) if self.batch_first else outputs)
        else:
            readout = self.fc(h_out)
        if not is_batched:
            readout = readout.squeeze(batch_dim)
            h, c = h[0], (c[0] if c is not None else None)
        return readout, ((h, c) if self.use_mixed else h)

    def forward_time_major(self, x: Tensor) -> Tensor:
        """The output sequence (T, B, output) for a time-major input (T, B, input), from a zero
        state with unit elapsed times: ``forward(x.transpose(0, 1))[0].transpose(0, 1)`` for a
        batch-first module returning sequences, without the layout round trips (the training
        stack chains its layers and its head time-major: no transposed copies)."""
        if not self.return_sequences:
            raise ValueError("forward_time_major needs return_sequences=True")
        h, c = self._initial_state(None, x.shape[1], True, x)
        if self._use_fused(None):
            hs, _ = self._fused(x, h, c, None)
        else:
            hs = self._loop(x, h, c, None)[0]
        return self.fc(hs)

    def _use_fused(self, ts) -> bool:
        return (
            self.fused
            and not self.wired_mode_enabled
            and not (self.training and self._backbone_dropout_active())
            and not (ts is not None and ts.requires_grad)
        )

    def _fused(self, x: Tensor, h, c, ts):
        """The plain cell through ``_FusedSequence``."""
        w = self._fused_weights(x, fuse_time=ts is None)
        pre = F.linear(x, w["pre_w"], w["pre_b"])
        lstm_pre = F.linear(x, w["lstm_in_w"], w["lstm_in_b"]) if self.use_mixed else None
        args = (
            w["spec"], pre, h, c, ts, w["h_weight"], lstm_pre, w["lstm_weight"], w["head_w"],
            w["head_b"], w["w_tau_abs"], w["amp"], *w["layer_params"],
        )  # fmt: skip
        if torch.is_grad_enabled():
            hs, c_last = _FusedSequence.apply(*args)
        else:
            # No graph to record: a lean loop without saved buffers (rollouts call this once
            # per bin, where fixed per-call costs dominate).
            hs, c_last = _infer_sequence(*args)
        return hs, (c_last if self.use_mixed else None)

    def _fused_weights(self, x: Tensor, fuse_time: bool) -> dict:
        """ncps' parameters rewritten for ``_FusedSequence``, with autograd, so gradients flow
        back to them. Without autograd (inference, e.g. one call per bin in a rollout) the
        result is cached until a parameter changes (in-place updates bump ``_version``)."""
        if torch.is_grad_enabled():
            return self._rewrite_weights(x, fuse_time)
        slots = self.__dict__.get("_param_slots")
        if slots is None:
            # Where each parameter lives; reading them through their owners' dicts notices a
            # replaced Parameter, ``data_ptr`` a moved or converted one, ``_version`` an
            # in-place update (optimiser steps, load_state_dict).
            slots = [
                (m._parameters, name)
                for m in self.modules()
                for name, p in m._parameters.items()
                if p is not None
            ]
            self.__dict__["_param_slots"] = slots
        key = (x.dtype, x.device, fuse_time, self.rnn_cell, getattr(self, "lstm", None))
        key += tuple((d[name].data_ptr(), d[name]._version) for d, name in slots)
        cached = self.__dict__.get("_fused_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._rewrite_weights(x, fuse_time))
            # Not an nn.Module attribute: kept out of state_dict, dropped when pickled.
            self.__dict__["_fused_cache"] = cached
        return cached[1]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_fused_cache", None)
        state.pop("_param_slots", None)
        return state

    def _rewrite_weights(self, x: Tensor, fuse_time: bool) -> dict:
        cell = self.rnn_cell
        n, n_in = self.state_size, self.input_size
        pure = cell.mode == "pure"
        if pure:
            head_w, head_b = cell.ff1.weight, cell.ff1.bias
        else:
            ta, tb = cell.time_a, cell.time_b
            if fuse_time:
                # ts == 1: time_a(x) * 1 + time_b(x) == (W_a + W_b) x + (b_a + b_b).
                t_w, t_b = [ta.weight + tb.weight], [ta.bias + tb.bias]
            else:
                t_w, t_b = [ta.weight, tb.weight], [ta.bias, tb.bias]
            # tanh(s) == 2 sigmoid(2 s) - 1: double the ff rows.
            head_w = torch.cat([2.0 * cell.ff1.weight, 2.0 * cell.ff2.weight, *t_w])
            head_b = torch.cat([2.0 * cell.ff1.bias, 2.0 * cell.ff2.bias, *t_b])

        w: dict = {"layer_params": [], "lstm_weight": None}
        acts: tuple = ()
        if cell.backbone_layers > 0:
            modules = list(cell.backbone)
            linears = [
                (m, modules[i + 1]) for i, m in enumerate(modules) if isinstance(m, nn.Linear)
            ]
            forms = [_sigmoid_form(act) for _, act in linears]
            acts = tuple(
                "sigmoid" if f else _activation_fn(a)
                for f, (_, a) in zip(forms, linears, strict=True)
            )
            first = linears[0][0]
            beta = forms[0][1] if forms[0] else 1.0
            w["pre_w"], w["pre_b"] = beta * first.weight[:, :n_in], beta * first.bias
            w["h_weight"] = beta * first.weight[:, n_in:]
            for (lin, _), prev, form in zip(linears[1:], forms, forms[1:], strict=False):
                lw, lb = _absorb(lin.weight, lin.bias, prev)
                if form is not None:
                    lw, lb = form[1] * lw, form[1] * lb
                w["layer_params"] += [lw, lb]
            w["head_w"], w["head_b"] = _absorb(head_w, head_b, forms[-1])
        else:
            w["pre_w"], w["pre_b"] = head_w[:, :n_in], head_b
            w["h_weight"] = head_w[:, n_in:]
            w["head_w"] = w["head_b"] = None

        if self.use_mixed:
            lstm = self.lstm
            # Double the input-activation rows (tanh as sigmoid); ncps adds 1.0 to the forget
            # gate's pre-activation, folded into the bias.
            scale = torch.ones(4 * n, 1, dtype=x.dtype, device=x.device)
            scale[:n] = 2.0
            offset = torch.zeros(4 * n, dtype=x.dtype, device=x.device)
            offset[2 * n : 3 * n] = 1.0
            w["lstm_in_w"] = lstm.input_map.weight * scale
            w["lstm_in_b"] = lstm.input_map.bias * scale[:, 0] + offset
            w["lstm_weight"] = lstm.recurrent_map.weight * scale

        w["spec"] = _Spec(cell.mode, n, self.use_mixed, cell.backbone_layers > 0, acts)
        w["w_tau_abs"] = torch.abs(cell.w_tau) if pure else None
        w["amp"] = cell.A if pure else None
        return w

    def _loop(self, x: Tensor, h, c, ts):
        """The general path: autograd through a per-step loop."""
        fuse_time = ts is None
        if self.wired_mode_enabled:
            cells = []
            in_features = self.rnn_cell.sensory_size
            for cell, size in zip(self.rnn_cell._layers, self.rnn_cell.layer_sizes, strict=True):
                cells.append(_CellWeights(cell, in_features, fuse_time))
                in_features = size
        else:
            cells = [_CellWeights(self.rnn_cell, self.input_size, fuse_time)]
        pre = cells[0].x_part(x)
        if self.use_mixed:
            lstm = self.lstm
            n = self.state_size
            # ncps adds 1.0 to the forget gate's pre-activation; fold it into the bias once.
            offset = torch.zeros(4 * n, dtype=x.dtype, device=x.device)
            offset[2 * n : 3 * n] = 1.0
            lstm_pre = F.linear(x, lstm.input_map.weight, lstm.input_map.bias + offset)
            lstm_wt = lstm.recurrent_map.weight.t()
        seq_len = pre.shape[0]
        # unbind, not indexing: indexing's backward zero-fills a whole (T, B, C) gradient per step.
        pre = pre.unbind(0)
        ts_steps = [None] * seq_len if ts is None else ts.unbind(0)
        if self.use_mixed:
            lstm_pre = lstm_pre.unbind(0)
        sizes = [cell.hidden for cell in cells]
        training = self.training
        outputs = []
        h_out = h
        for t in range(seq_len):
            if self.use_mixed:
                z = torch.addmm(lstm_pre[t], h, lstm_wt)
                act, gates = z.split([n, 3 * n], dim=1)
                in_gate, forget_gate, out_gate = torch.sigmoid(gates).split(n, dim=1)
                c = c * forget_gate + torch.tanh(act) * in_gate
                h = torch.tanh(c) * out_gate
            if len(cells) == 1:
                h = h_out = cells[0].step(pre[t], h, ts_steps[t], training)
            else:
                states = torch.split(h, sizes, dim=1)
                new_states = []
                for i, cell in enumerate(cells):
                    cell_pre = pre[t] if i == 0 else cell.x_part(h_out)
                    h_out = cell.step(cell_pre, states[i], ts_steps[t], training)
                    new_states.append(h_out)
                h = torch.cat(new_states, dim=1)
            if self.return_sequences:
                outputs.append(h_out)
        stacked = torch.stack(outputs) if self.return_sequences else None
        return stacked, h_out, h, c

    def _backbone_dropout_active(self) -> bool:
        backbone = getattr(self.rnn_cell, "backbone", None)
        return backbone is not None and any(
            isinstance(m, nn.Dropout) and m.p > 0.0 for m in backbone
        )

    @property
    def wired_mode_enabled(self) -> bool:
        # ncps sets `wired_mode = True` in wired mode and a misspelled flag otherwise.
        return getattr(self, "wired_mode", False)

    def _initial_state(self, hx, batch_size: int, is_batched: bool, x: Tensor):
        if hx is None:
            h = torch.zeros(batch_size, self.state_size, dtype=x.dtype, device=x.device)
            c = torch.zeros_like(h) if self.use_mixed else None
            return h, c
        if self.use_mixed and isinstance(hx, torch.Tensor):
            raise RuntimeError(
                "Running a CfC with mixed_memory=True, requires a tuple (h0,c0) to be passed "
                "as state (got torch.Tensor instead)"
            )
        h, c = hx if self.use_mixed else (hx, None)
        if is_batched and h.dim() != 2:
            raise RuntimeError(
                f"For batched 2-D input, hx and cx should also be 2-D but got ({h.dim()}-D) tensor"
            )
        if not is_batched:
            if h.dim() != 1:
                raise RuntimeError(
                    "For unbatched 1-D input, hx and cx should also be 1-D but got "
                    f"({h.dim()}-D) tensor"
                )
            h = h.unsqueeze(0)
            c = c.unsqueeze(0) if c is not None else None
        return h, c

    def _timespans(self, timespans, seq_len: int, batch_size: int, is_batched: bool, x: Tensor):
        """Elapsed times as a time-major (T, B, 1) tensor, or None for ncps' default of 1.0."""
        if timespans is None:
            return None
        ts = torch.as_tensor(timespans, dtype=x.dtype, device=x.device)
        if ts.dim() == 0:
            return ts.expand(seq_len, batch_size, 1)
        if not is_batched:
            ts = ts.unsqueeze(0 if self.batch_first else 1)
        if ts.dim() == 3 and ts.shape[-1] == 1:
            ts = ts.squeeze(-1)
        expected = (batch_size, seq_len) if self.batch_first else (seq_len, batch_size)
        if ts.dim() != 2 or tuple(ts.shape) != expected:
            layout = "(B, T) or (B, T, 1)" if self.batch_first else "(T, B) or (T, B, 1)"
            raise ValueError(
                f"timespans must have shape {layout} = {expected}, got {tuple(ts.shape)}"
            )
        if self.batch_first:
            ts = ts.transpose(0, 1)
        return ts.unsqueeze(-1)


@dataclass
class _StepLayer:
    """One unwired FastCfC layer prepared for single-step inference.

    The first Linear (and the LSTM's two maps) act on ``cat([x, h])``, as in ncps, so one
    matmul per Linear; weights are transposed and contiguous once, not per call.
    """

    spec: _Spec
    xh_wt: Tensor  # (I + H, Z0): first Linear (or the fused heads without a backbone)
    b0: Tensor
    layers: list  # [(weight.t(), bias)] for the backbone Linears after the first
    head_wt: Tensor | None
    head_b: Tensor | None
    lstm_wt: Tensor | None  # (I + H, 4H), input rows doubled, forget offset in lstm_b
    lstm_b: Tensor | None
    w_tau_abs: Tensor | None
    amp: Tensor | None

    @classmethod
    def from_module(cls, rnn: FastCfC, like: Tensor) -> _StepLayer:
        w = rnn._rewrite_weights(like, fuse_time=True)
        lstm_wt = lstm_b = None
        if w["spec"].mixed:
            lstm_wt = torch.cat([w["lstm_in_w"], w["lstm_weight"]], dim=1).t().contiguous()
            lstm_b = w["lstm_in_b"].contiguous()
        params = w["layer_params"]
        return cls(
            spec=w["spec"],
            xh_wt=torch.cat([w["pre_w"], w["h_weight"]], dim=1).t().contiguous(),
            b0=w["pre_b"].contiguous(),
            layers=[(params[i].t().contiguous(), params[i + 1]) for i in range(0, len(params), 2)],
            head_wt=None if w["head_w"] is None else w["head_w"].t().contiguous(),
            head_b=w["head_b"],
            lstm_wt=lstm_wt,
            lstm_b=lstm_b,
            w_tau_abs=w["w_tau_abs"],
            amp=w["amp"],
        )

    def __call__(self, x: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The same arithmetic as one step of ``_infer_sequence``."""
        spec = self.spec
        n = spec.hidden
        if spec.mixed:
            p_in, in_gate, forget_gate, out_gate = (
                torch.addmm(self.lstm_b, torch.cat([x, h], 1), self.lstm_wt)
                .sigmoid_()
                .split(n, dim=1)
            )
            c = torch.addcmul(c * forget_gate, p_in.mul(2.0).sub_(1.0), in_gate)
            h = torch.mul(c, 2.0).sigmoid_().mul_(2.0).sub_(1.0).mul_(out_gate)
        z = torch.addmm(self.b0, torch.cat([x, h], 1), self.xh_wt)
        if spec.has_backbone:
            for k, act in enumerate(spec.acts):
                if k > 0:
                    wt, b = self.layers[k - 1]
                    z = torch.addmm(b, z, wt)
                z = z.sigmoid_() if act == "sigmoid" else act(z)
            z = torch.addmm(self.head_b, z, self.head_wt)
        if spec.mode == "pure":
            e = torch.abs(z).add_(self.w_tau_abs).neg_().exp_()
            return e.mul_(z).mul_(-self.amp).add_(self.amp), c
        p1, p2, g = z.sigmoid_().split(n, dim=1)
        if spec.mode == "no_gate":
            return torch.addcmul(p1, g, p2).mul_(2.0).sub_(g).sub_(1.0), c
        return torch.lerp(p1, p2, g).mul_(2.0).sub_(1.0), c


def _native_stack(layers: list[_StepLayer], head: tuple, like: Tensor):
    """``cfc_kernels``' one-call step for the whole stack, when every layer has the layout of
    its loops (one sigmoid-form backbone Linear, one head mode, no mixed memory) and they are
    available for ``like``; else None (``StackStepper`` then issues the torch operations)."""
    first = layers[0].spec
    if not all(
        not ly.spec.mixed and ly.spec.has_backbone and ly.spec.acts == ("sigmoid",)
        and ly.spec.mode == first.mode and ly.spec.mode in ("default", "no_gate")
        and ly.spec.hidden == first.hidden and ly.head_wt is not None
        and ly.xh_wt.shape[1] == layers[0].xh_wt.shape[1]
        for ly in layers
    ):  # fmt: skip
        return None
    kernels = _native_loops(like)
    if kernels is None:
        return None
    head_wt, head_b = head
    if head_b is None:
        head_b = head_wt.new_zeros(head_wt.shape[1])
    return cfc_kernels.StackWeights(
        kernels,
        first.mode != "no_gate",
        [(ly.xh_wt, ly.b0.contiguous(), ly.head_wt, ly.head_b.contiguous()) for ly in layers],
        head_wt,
        head_b.detach().contiguous(),
    )


class StackStepper:
    """One bin of a stack of unwired ``FastCfC`` layers plus a linear head, without autograd.

    Rollouts call a model once per bin for one or a few patients, where fixed per-call costs
    (argument handling, per-layer module calls, re-validating every cached weight) outweigh
    the arithmetic. This runs the whole stack on weights prepared once and re-prepared only
    when a parameter changes, which is checked once per call over all layers and the head.
    ``__call__(x, state)`` takes the stack's flat state list (``[h]`` per layer, ``[h, c]``
    with mixed memory) and returns ``(head output, new state list)``.
    """

    def __init__(self, rnns, head: nn.Module) -> None:
        if not isinstance(head, nn.Linear) or not all(
            isinstance(r, FastCfC) and not r.wired_mode_enabled and isinstance(r.fc, nn.Identity)
            for r in rnns
        ):
            raise TypeError("StackStepper needs unwired FastCfC layers (no proj_size) and a Linear")
        self.rnns = list(rnns)
        self.head = head
        # Read through the owners' dicts: notices a replaced Parameter; ``data_ptr`` a moved or
        # converted one; ``_version`` an in-place update (optimiser steps, load_state_dict).
        self._slots = [
            (m._parameters, name)
            for owner in (*self.rnns, head)
            for m in owner.modules()
            for name, p in m._parameters.items()
            if p is not None
        ]
        self._cached: tuple | None = None  # (key, prepared weights)

    def applies(self) -> bool:
        """Whether every layer can take the lean path in its current state (flags can change
        after construction: ``fused``, ``train()`` with backbone dropout)."""
        return all(r.fused and not (r.training and r._backbone_dropout_active()) for r in self.rnns)

    def _prepared(self, x: Tensor) -> tuple:
        key = (
            x.dtype, x.device, _NATIVE_LOOPS,
            *((d[k].data_ptr(), d[k]._version) for d, k in self._slots),
        )  # fmt: skip
        cached = self._cached  # one tuple, replaced whole: safe for concurrent readers
        if cached is None or cached[0] != key:
            with torch.no_grad():
                layers = [_StepLayer.from_module(r, x) for r in self.rnns]
                head = (self.head.weight.t().contiguous(), self.head.bias)
                native = _native_stack(layers, head, x)
            cached = (key, (layers, head, native))
            self._cached = cached
        return cached[1]

    def forecast(
        self,
        x: Tensor,
        lengths: Tensor,
        future: Tensor,
        bounds: tuple[Tensor, Tensor] | None,
        residual: bool,
    ) -> Tensor | None:
        """A whole rollout (``training.rollout.forecast_rollout``) in one native call, or None
        where the native loops do not cover this stack."""
        native = self._prepared(x)[2]
        if native is None:
            return None
        if bounds is not None:
            bounds = (bounds[0].to(x.dtype).contiguous(), bounds[1].to(x.dtype).contiguous())
        return native.forecast(
            x.contiguous(), lengths.to(torch.int64).contiguous(), future.to(x.dtype).contiguous(),
            bounds, residual,
        )  # fmt: skip

    def __call__(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        layers, (head_wt, head_b), native = self._prepared(x)
        if native is not None:
            if x.stride(-1) != 1:
                x = x.contiguous()
            return native.step(x, [s.contiguous() for s in state])
        new: list[Tensor] = []
        i = 0
        h = x
        for layer in layers:
            if layer.spec.mixed:
                h, c = layer(h, state[i], state[i + 1])
                new += [h, c]
                i += 2
            else:
                h, _ = layer(h, state[i], None)
                new.append(h)
                i += 1
        out = torch.addmm(head_b, h, head_wt) if head_b is not None else h @ head_wt
        return out, new
