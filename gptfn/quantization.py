"""The transform into a weight format: ``gptfn.quantize(model_or_params, scheme)``.

(This module is ``quantization``, not ``quantize``: a submodule of that name would shadow
the function ``gptfn.quantize`` on the package, as ``generation`` does not ``generate``.)

``bf16`` / ``fp16`` round the matrices to that dtype. ``int8`` is symmetric, one fp32 scale
per output channel (``scale = max |w| / 127`` over the channel, ``q = round(w / scale)``).
``int4`` is llama.cpp's q4_0 rule per group of 32 inputs: the value of largest magnitude
``m`` maps to -8 (``scale = -m / 8``, in fp16), ``q = round(w / scale)`` clamped to [-8, 7],
so the group's extreme is exact and the other end of the range keeps its 8th level. The
layouts are those ``gptfn.formats`` describes. Everything else is kept in fp32. The result runs
wherever the core runs; ``gptfn.kernels`` is the faster route a caller may choose for it.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Union

import torch
from torch import Tensor

from gptfn.formats import (GROUP, SCALE_SUFFIX, int4_problem, matrix_keys, output_dim,
                           scale_key, scheme_of, stored_dtype)
from gptfn.functional.layers import unpack_int4


def num_layers_of(params: Mapping[str, Tensor]) -> int:
    """The number of blocks in a canonical parameter dict."""
    found = {int(m.group(1)) for k in params if (m := re.match(r"h\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def quantize_params(params: Mapping[str, Tensor], scheme: str) -> Dict[str, Tensor]:
    """A new parameter dict with ``params``' matrices in ``scheme`` (see the module
    docstring). ``params`` must be plain (one floating dtype); they are not modified."""
    want = stored_dtype(scheme)
    if scheme_of(params) is not None:
        raise ValueError(f"the parameters are already in the {scheme_of(params)} "
                         "format: quantize a plain (fp32) model")
    matrices = set(matrix_keys(num_layers_of(params)))
    if scheme == "int4":
        problems = [p for k in sorted(matrices & set(params))
                    if (p := int4_problem(k, params[k].shape))]
        if problems:
            raise ValueError("; ".join(problems))
    out: Dict[str, Tensor] = {}
    for key, t in params.items():
        w = t.detach().float()
        if key not in matrices:
            out[key] = w
        elif scheme == "int8":
            out[key], out[scale_key(key)] = int8_per_channel(w, output_dim(key))
        elif scheme == "int4":  # the product's [in, out] weight: wte as the head's [C, V]
            out[key], out[scale_key(key)] = int4_groupwise(w.t() if key == "wte.weight" else w)
        else:
            out[key] = w.to(want)
    return out


def int8_per_channel(w: Tensor, dim: int):
    """Symmetric int8 with one scale per index of ``dim``: ``(q, scale)``, ``q * scale ~ w``.

    Shapes: w (R, S) -> q (R, S) int8, scale (w.size(dim),) fp32.
    """
    other = 1 - dim
    amax = w.abs().amax(dim=other)  # (w.size(dim),)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale.unsqueeze(other)).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def int4_groupwise(w: Tensor):
    """Symmetric int4 per group of ``GROUP`` inputs, packed (``gptfn.formats``): ``(packed,
    scale)``, ``unpack_int4(packed, scale) ~ w``.

    Shapes: w (in, out) -> packed (in/2, out) uint8, scale (in/32, out) fp16.
    """
    n_in, n_out = w.shape
    groups = w.reshape(n_in // GROUP, GROUP, n_out)  # (in/32, 32, out)
    extreme = groups.gather(1, groups.abs().argmax(dim=1, keepdim=True))  # (in/32, 1, out)
    scale = (extreme / -8.0).to(torch.float16)
    wide = scale.float()
    inverse = torch.where(wide != 0, 1.0 / wide, torch.zeros_like(wide))
    q = torch.round(groups * inverse).clamp_(-8, 7)
    u = (q + 8).to(torch.uint8).reshape(n_in, n_out)  # (in, out), values 0..15
    packed = u[0::2] | (u[1::2] << 4)  # (in/2, out): input 2k low, 2k + 1 high
    return packed.contiguous(), scale.squeeze(1).contiguous()


def dequantize_params(params: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The plain fp32 parameters a format stands for (each matrix widened and scaled)."""
    out: Dict[str, Tensor] = {}
    for key, t in params.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        w = t.float()
        scale = params.get(scale_key(key))
        if t.dtype == torch.uint8:  # int4, the product's [in, out]: wte back to [V, C]
            w = unpack_int4(t, scale, torch.float32)
            out[key] = w.t().contiguous() if key == "wte.weight" else w
            continue
        if scale is not None:
            w = w * scale.unsqueeze(1 - output_dim(key))
        out[key] = w
    return out


def quantize(model_or_params: Union["torch.nn.Module", Mapping[str, Tensor]], scheme: str):
    """``model_or_params`` in weight format ``scheme`` (``bf16``, ``fp16``, ``int8`` or
    ``int4``): a new ``GPTModel`` for a model, a new dict for a parameter dict. The input is
    not modified."""
    from gptfn.modules import GPTModel, params_of

    if isinstance(model_or_params, Mapping):
        return quantize_params(model_or_params, scheme)
    model = getattr(model_or_params, "_orig_mod", model_or_params)
    if not isinstance(model, GPTModel):
        raise TypeError(f"quantize takes a GPTModel or a parameter dict, got "
                        f"{type(model_or_params).__name__}")
    params = params_of(model)
    if any(t.device.type != "cpu" for t in params.values()):
        raise ValueError("weight formats run on the CPU: move the model there first")
    quantized = GPTModel(model.config, params=quantize_params(params, scheme))
    return quantized.train(model.training)
