"""Weight formats: how the matrices of a parameter dict are stored.

A format is a property of the parameters themselves, so that eager, compiled, scripted and
exported code all read it the same way (``gptfn.functional.linear`` looks at the weight):

- plain (no scheme): every tensor in one floating dtype, which is also the compute dtype.
- ``bf16`` / ``fp16``: the matrices are stored in that dtype; everything else (norms,
  biases, ``wpe``) stays fp32, and activations and accumulation are fp32.
- ``int8``: the matrices are int8, symmetric (values in [-127, 127]), with one fp32 scale
  per output channel under
  ``<key>_scale``: a Conv1D weight ``[in, out]`` has a scale of shape ``(out,)``; the token
  table ``wte [V, C]`` one per row, ``(V,)``, which serves both the embedding (a row) and the
  tied head (an output).
- ``int4``: groupwise symmetric 4-bit, as llama.cpp's q4_0: values ``q`` in [-8, 7], one
  fp16 scale per output and group of ``GROUP`` (32) consecutive inputs. Every matrix is
  stored as the weight of its product, ``[in, out]``: the Conv1D weights as they are, the
  token table ``wte [V, C]`` as the tied head's ``[C, V]``. Two inputs share a byte, packed
  along ``in``: byte ``(k, o)`` of the uint8 ``(in/2, out)`` tensor holds ``q[2k, o] + 8``
  in its low four bits and ``q[2k + 1, o] + 8`` in its high four; ``<key>_scale`` is fp16
  ``(in/32, out)``. Packing along ``in`` keeps each group's values and scale in the order
  a product reads them; the embedding reads a column (``functional.layers.unpack_int4``).

The matrices are ``wte`` (the tied head, the largest) and each block's four Conv1D weights.
``gptfn.quantize`` makes a format; ``gptfn.weights`` records it in ``config.json`` as
``"quantization": {...}``.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

SCHEMES = ("bf16", "fp16", "int8", "int4")
GROUP = 32  # int4: inputs per scale
SCALE_SUFFIX = "_scale"
_STORED = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8,
           "int4": torch.uint8}
_SCHEME_OF = {dtype: scheme for scheme, dtype in _STORED.items()}
_BLOCK_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_proj.weight")


def matrix_keys(num_layers: int) -> List[str]:
    """The keys a weight format stores: ``wte.weight`` and each block's four matrices."""
    return ["wte.weight"] + [f"h.{i}.{m}" for i in range(num_layers) for m in _BLOCK_MATRICES]


def scale_key(key: str) -> str:
    """``h.0.mlp.c_fc.weight`` -> ``h.0.mlp.c_fc.weight_scale``."""
    return key + SCALE_SUFFIX


def output_dim(key: str) -> int:
    """The dimension of ``key``'s output channels: rows for ``wte`` ([V, C], the head's
    outputs), columns for Conv1D weights ([in, out])."""
    return 0 if key == "wte.weight" else 1


def _inputs_outputs(key: str, shape: Sequence[int]) -> Tuple[int, int]:
    """(inputs, outputs) of matrix ``key`` of canonical ``shape``."""
    out = output_dim(key)
    return shape[1 - out], shape[out]


def int4_shape(key: str, shape: Sequence[int]) -> Tuple[int, int]:
    """The shape int4 stores matrix ``key`` of canonical ``shape`` in: the product's
    ``[in, out]`` weight packed two inputs a byte, ``(in/2, out)`` (``wte [V, C]`` -> ``(C/2,
    V)``)."""
    n_in, n_out = _inputs_outputs(key, shape)
    return (n_in // 2, n_out)


def int4_problem(key: str, shape: Sequence[int]) -> Optional[str]:
    """Why matrix ``key`` of canonical ``shape`` cannot be stored in int4, or None."""
    n_in, _ = _inputs_outputs(key, shape)
    if n_in % GROUP:
        return (f"{key}: int4 needs the inputs of each matrix in whole groups of {GROUP}, "
                f"got {n_in}")
    return None


def stored_dtype(scheme: str) -> torch.dtype:
    """The dtype a scheme stores its matrices in."""
    if scheme not in _STORED:
        raise ValueError(f"unknown weight format {scheme!r}: choose one of {', '.join(SCHEMES)}")
    return _STORED[scheme]


def scheme_of(params: Mapping[str, Tensor]) -> Optional[str]:
    """The scheme ``params``' matrices are stored in, or None for a plain dict (matrices in
    the dtype of ``wpe.weight``, the compute dtype). Assumes ``format_problems`` is empty:
    every matrix is in ``wte``'s format."""
    wte, compute = params["wte.weight"], params["wpe.weight"].dtype
    if wte.dtype == compute and scale_key("wte.weight") not in params:
        return None
    return _SCHEME_OF[wte.dtype]


def format_problems(params: Mapping[str, Tensor], num_layers: int) -> List[str]:
    """What keeps ``params`` (keys and shapes already checked) from being in one format."""
    problems: List[str] = []
    compute = params["wpe.weight"].dtype
    matrices = matrix_keys(num_layers)
    others = {k: t for k, t in params.items()
              if k not in matrices and not k.endswith(SCALE_SUFFIX)}
    for key, t in others.items():
        if not t.dtype.is_floating_point:
            problems.append(f"{key}: expected a floating-point tensor, got {t.dtype}")
    dtypes = {t.dtype for t in others.values()}
    if len(dtypes) > 1:
        problems.append(f"tensors have mixed dtypes {sorted(str(d) for d in dtypes)}")
    kinds: Dict[str, List[str]] = {}
    for key in matrices:
        t = params[key]
        if t.dtype == compute:
            kind = "plain"
        elif t.dtype in _SCHEME_OF and compute == torch.float32:
            kind = _SCHEME_OF[t.dtype]
        else:
            problems.append(f"{key}: expected a floating-point tensor of the model's dtype "
                            f"{compute} or a weight format (bf16, fp16, int8, int4 as "
                            f"uint8), got {t.dtype}")
            continue
        kinds.setdefault(kind, []).append(key)
        scale = params.get(scale_key(key))
        if kind == "int4":
            want = (2 * t.size(0) // GROUP, t.size(1))
            if scale is None:
                problems.append(f"{key}: an int4 matrix needs {scale_key(key)}")
            elif tuple(scale.shape) != want or scale.dtype != torch.float16:
                problems.append(f"{scale_key(key)}: expected fp16 of shape {list(want)}, "
                                f"got {scale.dtype} {list(scale.shape)}")
        elif kind == "int8":
            if bool((t == -128).any()):  # the kernels' sign trick needs |value| <= 127
                problems.append(f"{key}: int8 values must lie in [-127, 127] (symmetric), "
                                "found -128")
            want = (t.size(output_dim(key)),)
            if scale is None:
                problems.append(f"{key}: an int8 matrix needs {scale_key(key)}")
            elif tuple(scale.shape) != want or scale.dtype != torch.float32:
                problems.append(f"{scale_key(key)}: expected fp32 of shape {list(want)}, "
                                f"got {scale.dtype} {list(scale.shape)}")
        elif scale is not None:
            problems.append(f"{scale_key(key)}: only int8 and int4 matrices have a scale")
    if len(kinds) > 1:
        problems.append("matrices are in several formats: "
                        + ", ".join(f"{k} ({v[0]} ...)" for k, v in sorted(kinds.items())))
    stray = [k for k in params if k.endswith(SCALE_SUFFIX) and k[:-len(SCALE_SUFFIX)]
             not in matrices]
    if stray:
        problems.append(f"unexpected keys: {', '.join(stray[:12])}")
    return problems


def quantization_entry(scheme: str) -> Dict[str, object]:
    """What ``config.json`` records under ``"quantization"`` for a scheme."""
    entry: Dict[str, object] = {
        "scheme": scheme,
        "weights": "wte and each block's c_attn, attn.c_proj, c_fc, mlp.c_proj",
        "compute_dtype": "float32",
    }
    if scheme == "int8":
        entry.update({"symmetric": True, "granularity": "per_output_channel",
                      "scale_suffix": SCALE_SUFFIX})
    if scheme == "int4":
        entry.update({"symmetric": True, "granularity": "group", "group_size": GROUP,
                      "scale_dtype": "float16", "scale_suffix": SCALE_SUFFIX,
                      "packing": "two values a byte along the inputs of each [in, out] "
                                 "product weight (wte as [C, V]), low nibble first, "
                                 "stored as q + 8"})
    return entry
