"""Next-token cross-entropy fused with the tied output head, computed in row chunks.

``linear_cross_entropy(x, wte, targets)`` equals
``F.cross_entropy(x @ wte.T, targets)`` but never holds the (N, V) logits: for each chunk
of rows it forms the logits, takes their log-sum-exp and, when a gradient will be needed,
turns them at once into the gradient (softmax minus one-hot) and folds that into the
gradients of ``x`` and ``wte``. The matrix products are the same three a plain head does;
what goes away is writing and re-reading 4 x N x V bytes several times (logits, log-probs,
their gradients) and zero-filling them, which on GPT-2's 50257-word vocabulary is the
largest memory traffic of a training step. ``benchmarks/training.py`` measures it against
HF transformers.

Not TorchScript (an autograd.Function): scripted modules use ``F.cross_entropy``.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB of fp32)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        n, v = x.size(0), weight.size(0)
        rows = max(1, CHUNK_ELEMENTS // v)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if want_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, n, rows):
            xc, tc = x[s:s + rows], targets[s:s + rows]
            logits = (xc @ weight.t()).float()  # (r, C) @ (C, V) -> (r, V)
            lse = torch.logsumexp(logits, dim=-1)  # (r,)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if want_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(tc.numel(), device=x.device), tc] -= 1.0  # minus one-hot
                probs = probs.to(x.dtype)
                grad_x[s:s + rows] = probs @ weight  # (r, V) @ (V, C) -> (r, C)
                grad_w.addmm_(probs.t().float(), xc.float())  # (V, r) @ (r, C) -> (V, C)
        if want_grad:
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        return grad_x * scale, grad_w * scale, None


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``x @ weight.T`` against ``targets``, fused and chunked.

    Shapes: x (N, C), weight (V, C), targets (N,) int64 -> scalar.
    """
    if x.dim() != 2 or targets.shape != (x.size(0),):
        raise ValueError(f"expected x (N, C) and targets (N,), got {list(x.shape)} and "
                         f"{list(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.size(0)):
        raise ValueError(f"targets must be token ids in [0, {weight.size(0)})")
    return _LinearCrossEntropy.apply(x, weight, targets)
