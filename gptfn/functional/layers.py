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


def linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor] = None
) -> Tensor:
    """``x @ weight + bias`` with GPT-2's ``[in, out]`` weight layout.

    The weight's format is a property of the data (``gptfn.formats``). A weight of ``x``'s
    dtype with no ``scale`` is one aten ``addmm``. A weight in a weight-only format (bf16 or
    fp16 under fp32 activations, or int8 with one fp32 ``scale`` per output) is widened to
    ``x``'s dtype, multiplied, then scaled per output: plain aten too, so every format runs
    wherever the core runs (eager, TorchScript, torch.compile, torch.export). A faster
    kernel for a format is the caller's choice, made outside the core (``gptfn.kernels``
    rewrites this product in the graph it compiles).

    An int4 weight (uint8, two values a byte) is unpacked with its group scales
    (``unpack_int4``) before the product.

    Shapes: x (..., in), weight (in, out), bias (out,) or None, scale (out,) or None
    -> (..., out); int4: weight (in/2, out) uint8, scale (in/32, out) fp16.
    """
    if weight.dtype == x.dtype and scale is None:
        # F.linear computes x @ W.T + b; W = weight.t() is a view, so this is one addmm
        # over the contiguous [in, out] weight: no copy, no transpose.
        return F.linear(x, weight.t(), bias)
    if weight.dtype == torch.uint8:  # int4: packed pairs, a scale per group of inputs
        if scale is None:
            raise ValueError("an int4 weight needs its scales")
        y = F.linear(x, unpack_int4(weight, scale, x.dtype).t())  # (..., in) -> (..., out)
        return y if bias is None else y + bias
    y = F.linear(x, weight.to(x.dtype).t())  # (..., in) @ (in, out) -> (..., out)
    if scale is not None:
        y = y * scale  # one scale per output channel
    return y if bias is None else y + bias


def unpack_int4(packed: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``[in, out]`` matrix an int4 weight stands for (``gptfn.formats``): byte ``(k, o)``
    holds inputs ``2k`` (low nibble) and ``2k + 1`` (high), each stored as ``q + 8`` for ``q``
    in [-8, 7]; one scale per output and group of ``in / scale.size(0)`` inputs.

    Shapes: packed (in/2, out) uint8, scale (in/G, out) -> (in, out) in ``dtype``.
    """
    pairs = torch.stack([packed & 15, packed >> 4], dim=1)  # (in/2, 2, out)
    q = pairs.reshape(-1, packed.size(1)).to(dtype) - 8.0  # (in, out)
    groups = q.view(scale.size(0), -1, q.size(1))  # (in/G, G, out)
    return (groups * scale.to(dtype).unsqueeze(1)).view(q.size(0), q.size(1))  # (in, out)


def feed_forward(
    x: Tensor,
    c_fc_weight: Tensor,
    c_fc_bias: Tensor,
    c_proj_weight: Tensor,
    c_proj_bias: Tensor,
    c_fc_scale: Optional[Tensor] = None,
    c_proj_scale: Optional[Tensor] = None,
) -> Tensor:
    """GPT-2's MLP: expand to 4C, GELU (tanh), project back to C.

    Uses the fused ``F.gelu(approximate="tanh")``; ``gelu`` above is the same formula.
    The scales belong to int8 weights (see ``linear``).

    Shapes: x (B, T, C), c_fc_weight (C, 4C), c_proj_weight (4C, C) -> (B, T, C).
    """
    h = linear(x, c_fc_weight, c_fc_bias, c_fc_scale)  # (B, T, C) -> (B, T, 4C)
    h = F.gelu(h, approximate="tanh")
    return linear(h, c_proj_weight, c_proj_bias, c_proj_scale)  # (B, T, 4C) -> (B, T, C)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout; the identity when not training or when ``p == 0``.

    Shapes: any -> same.
    """
    if training and p > 0.0:
        return F.dropout(x, p, training=True)
    return x
