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

Targets equal to ``ignore_index`` (default -100, ``F.cross_entropy``'s and HF's
convention for padding) are left out: the mean is over the other positions, and the ignored
ones get no gradient. If every target is ignored the loss is NaN (0 / 0), with zero
gradients, exactly as ``F.cross_entropy`` gives.

Not TorchScript (an autograd.Function): scripted modules use ``F.cross_entropy``.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB of fp32)
IGNORE_INDEX = -100  # targets left out of the loss (padding), as in F.cross_entropy


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        n, v = x.size(0), weight.size(0)
        rows = max(1, CHUNK_ELEMENTS // v)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if want_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        kept = targets != ignore_index  # (N,)
        # (N,) ignored rows read class 0, then count 0; so does a target outside [0, V),
        # which the caller's assertion fails: a read past the logits inside a compiled
        # kernel's parallel loop would end the whole process instead
        safe = torch.where(kept & (targets >= 0) & (targets < v), targets, 0)
        count = kept.sum()  # () the mean's denominator
        for s in range(0, n, rows):
            xc, tc, kc = x[s:s + rows], safe[s:s + rows], kept[s:s + rows, None]  # kc (r, 1)
            logits = (xc @ weight.t()).float()  # (r, C) @ (C, V) -> (r, V)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (r, 1)
            loss = lse - logits.gather(1, tc[:, None])  # (r, 1)
            total += torch.where(kc, loss, 0.0).sum()
            if want_grad:
                probs = logits.sub_(lse).exp_()  # softmax, in place of the logits
                probs[torch.arange(tc.numel(), device=x.device), tc] -= 1.0  # minus one-hot
                probs = probs.to(x.dtype)
                # ignored rows: zero their (r, C) sides, not the (r, V) probabilities
                gx = probs @ weight  # (r, V) @ (V, C) -> (r, C)
                grad_x[s:s + rows] = torch.where(kc, gx, 0.0)
                xk = torch.where(kc, xc, 0.0).float()  # (r, C)
                grad_w.addmm_(probs.t().float(), xk)  # (V, r) @ (r, C) -> (V, C)
        if want_grad:
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype), count)
        return total / count  # NaN when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x, grad_w, count = ctx.saved_tensors
        scale = grad_out / count.clamp(min=1)  # all ignored: zero gradients, as F.cross_entropy
        return grad_x * scale, grad_w * scale, None, None


def linear_cross_entropy(
    x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Mean cross-entropy of ``x @ weight.T`` against ``targets``, fused and chunked, over
    the positions whose target is not ``ignore_index``.

    Shapes: x (N, C), weight (V, C), targets (N,) int64 or int32 -> scalar.
    """
    if x.dim() != 2 or targets.shape != (x.size(0),):
        raise ValueError(f"expected x (N, C) and targets (N,), got {list(x.shape)} and "
                         f"{list(targets.shape)}")
    if targets.dtype != torch.long and targets.dtype != torch.int:
        raise ValueError(
            f"targets must hold integer token ids (int64 or int32), got {targets.dtype}"
        )
    v = weight.size(0)
    # asserted on the device, not read back: no sync, and a compiled step traces it whole.
    # Eager, a failed assertion is a RuntimeError; in compiled CPU code it ends the process
    # (inductor raises it inside a parallel region), as torch's own compiled cross-entropy
    # does on a bad target: batches are checked where they enter (gptfn.inputs.check_targets,
    # which names the id: the training loop, GPTModel given a list).
    ok = (targets == ignore_index) | ((targets >= 0) & (targets < v))
    torch._assert_async(ok.all(), f"targets must be token ids in [0, {v}) or {ignore_index} "
                                  "(ignore_index)")
    return _LinearCrossEntropy.apply(x, weight, targets, ignore_index)
