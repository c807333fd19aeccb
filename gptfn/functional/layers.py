"""Elementwise and dense layers: gelu, layer_norm, linear, feed_forward.

Weights are GPT-2's Conv1D layout, ``[in, out]``, so ``linear(x, w, b) = x @ w + b``.
Every function here is ``torch.jit.script``-able.

Symbols: B batch, T sequence length, C embedding width (embed_dim).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def gelu(x: Tensor) -> Tensor:
    """GPT-2's GELU, tanh approximation, written out.

    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``; equals
    ``F.gelu(x, approximate="tanh")`` to fp32 rounding.

    Shapes: any -> same.
    """
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Layer normalisation over the last dimension with learnable scale and shift, written out.

    Biased variance, as in GPT-2; equals ``F.layer_norm`` to fp32 rounding.

    Shapes: x (..., C), weight (C,), bias (C,) -> (..., C).
    """
    mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)  # (..., 1)
    return (x - mean) * torch.rsqrt(var + eps) * weight + bias


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ weight + bias`` with GPT-2's ``[in, out]`` weight layout.

    Shapes: x (..., in), weight (in, out), bias (out,) or None -> (..., out).
    """
    if not torch.jit.is_scripting():
        if one_cpu_row(x, weight):
            y = torch.ops.gptfn.gemv(x.reshape(1, -1), weight, False)  # (1, in) -> (1, out)
            y = y.view(x.shape[:-1] + (weight.size(1),))
            return y if bias is None else y + bias
    # F.linear computes x @ W.T + b; W = weight.t() is a view, so this is one addmm
    # over the contiguous [in, out] weight: no copy, no transpose.
    return F.linear(x, weight.t(), bias)


# Below this many weights the op's fixed cost (a numpy call, holding OpenBLAS to one
# thread) outweighs its faster streaming (measured crossover: 2-6e5 on this CPU).
GEMV_MIN_WEIGHT = 1 << 19


def one_cpu_row(x: Tensor, weight: Tensor) -> bool:
    """Whether a product of ``x`` with ``weight`` goes to the op ``gptfn::gemv``: one row
    of fp32 CPU data, a contiguous weight of at least ``GEMV_MIN_WEIGHT`` elements, no
    gradient needed, and the op registered (by
    ``gptfn.cpu_gemv``, where numpy's BLAS is OpenBLAS). See ``gptfn/cpu_gemv.py`` for why.
    Never true in TorchScript (callers check ``torch.jit.is_scripting()`` first) or under
    ``torch.export``.
    """
    return (
        not torch.compiler.is_exporting()  # exported programs stay pure aten (AOTI, C++)
        and x.numel() == x.size(-1)
        and weight.numel() >= GEMV_MIN_WEIGHT
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and hasattr(torch.ops.gptfn, "gemv")
    )


def feed_forward(
    x: Tensor,
    c_fc_weight: Tensor,
    c_fc_bias: Tensor,
    c_proj_weight: Tensor,
    c_proj_bias: Tensor,
) -> Tensor:
    """GPT-2's MLP: expand to 4C, GELU (tanh), project back to C.

    Uses the fused ``F.gelu(approximate="tanh")``; ``gelu`` above is the same formula.

    Shapes: x (B, T, C), c_fc_weight (C, 4C), c_proj_weight (4C, C) -> (B, T, C).
    """
    h = linear(x, c_fc_weight, c_fc_bias)  # (B, T, C) -> (B, T, 4C)
    h = F.gelu(h, approximate="tanh")
    return linear(h, c_proj_weight, c_proj_bias)  # (B, T, 4C) -> (B, T, C)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout; the identity when not training or when ``p == 0``.

    Shapes: any -> same.
    """
    if training and p > 0.0:
        return F.dropout(x, p, True)
    return x
