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
        compiling = torch.compiler.is_compiling()
        if one_cpu_row(x, weight, compiling):
            if compiling:
                y = row_product(x, weight)  # (..., in) -> (..., out), one row
            else:
                y = torch.ops.gptfn.gemv(x.reshape(1, -1), weight, False)  # (1, in) -> (1, out)
                y = y.view(x.shape[:-1] + (weight.size(1),))
            return y if bias is None else y + bias
    # F.linear computes x @ W.T + b; W = weight.t() is a view, so this is one addmm
    # over the contiguous [in, out] weight: no copy, no transpose.
    return F.linear(x, weight.t(), bias)


# Below this many weights the op's fixed cost (a numpy call, holding OpenBLAS to one
# thread) outweighs its faster streaming (measured crossover: 2-6e5 on this CPU).
GEMV_MIN_WEIGHT = 1 << 19


def one_cpu_row(x: Tensor, weight: Tensor, compiled: bool = False) -> bool:
    """Whether a product of ``x`` with ``weight`` is one row of CPU data that streams a
    contiguous weight of at least ``GEMV_MIN_WEIGHT`` elements with no gradient needed,
    and so takes the bandwidth-bound route. Eager: fp32 only, to the op ``gptfn::gemv``
    (registered by ``gptfn.cpu_gemv`` where numpy's BLAS is OpenBLAS; see that file for
    why). ``compiled`` (under torch.compile): fp32 or bf16, to ``row_product``, which
    inductor turns into vectorized reductions. Never true in TorchScript (callers check
    ``torch.jit.is_scripting()`` first) or under ``torch.export``.
    """
    dtypes = (torch.float32, torch.bfloat16) if compiled else (torch.float32,)
    return (
        not torch.compiler.is_exporting()  # exported programs stay pure aten (AOTI, C++)
        and x.numel() == x.size(-1)
        and weight.numel() >= GEMV_MIN_WEIGHT
        and x.device.type == "cpu"
        and x.dtype in dtypes
        and weight.dtype == x.dtype
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and (compiled or hasattr(torch.ops.gptfn, "gemv"))
    )


# Rows of the weight per slab in ``row_product``: measured on GPT-2 124M's compiled decode
# on this CPU, 8 gave 73-78 tokens/s in fp32 and 97 in bf16 (4: 50 and 87; 16: 72 and 77;
# 32: 67), against 58 and 61 for the BLAS routes. At GPT-2 XL's widths it only matches the
# eager OpenBLAS route (5.4 against 5.3 tokens/s in fp32).
ROW_SLAB = 8


def row_product(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight`` for one row, written as reductions for inductor to compile.

    A reduction over ``weight``'s first dimension alone reads it column-strided and
    vectorizes poorly, and a BLAS call is opaque to the compiler. Cut into slabs of
    ``ROW_SLAB`` contiguous rows: each slab's partial sum streams its rows (vectorized
    along ``out``), the slabs run in parallel, and a second reduction adds the partials.
    Accumulates in fp32.

    Shapes: x (..., in) holding one row, weight (in, out) -> (..., out).
    """
    n_in, n_out = weight.shape
    k = math.gcd(n_in, ROW_SLAB)  # rows per slab (divides in)
    xs = x.reshape(n_in // k, k, 1).float()  # (1, in) -> (in/k, k, 1)
    ws = weight.view(n_in // k, k, n_out).float()  # (in, out) -> (in/k, k, out)
    y = (xs * ws).sum(1).sum(0)  # (in/k, k, out) -> (in/k, out) -> (out,)
    return y.to(weight.dtype).view(x.shape[:-1] + (n_out,))


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
