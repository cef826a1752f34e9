"""Training memory of a model, measured from the model and not from the process.

The resident memory of a process that has imported torch, Lightning and MLflow is dominated
by those libraries; it says little about the model. This counts what one optimisation step of
the model needs: parameters, their gradients and Adam's two moment buffers, plus every tensor
autograd saves for the backward pass of one training batch (storages counted once).
"""

from __future__ import annotations

import torch


def training_step_bytes(loss_fn, params: list[torch.Tensor]) -> dict[str, float]:
    """Bytes of one step: ``loss_fn()`` runs the forward pass of one training batch."""
    seen: set[tuple[int, int]] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            saved += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    for p in params:
        p.grad = None
    return {
        "train_mem_mb": (4 * param_bytes + saved) / 2**20,  # weights, grads, Adam m and v
        "activation_mem_mb": saved / 2**20,
    }
