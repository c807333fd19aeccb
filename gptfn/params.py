"""The canonical parameter dict: its keys and shapes, GPT-2's initialisation, validation.

Keys are the GPT-2 hub checkpoint's (no ``transformer.`` prefix); weights are ``[in, out]``;
the output head is ``wte`` itself, so there is no ``lm_head.weight``.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from gptfn.config import GPTConfig
from gptfn.formats import (SCALE_SUFFIX, format_problems, int4_problem, int4_shape,
                           matrix_keys)

Shape = Tuple[int, ...]


def block_shapes(config: GPTConfig, i: int) -> Dict[str, Shape]:
    """Keys and shapes of block ``i``, in checkpoint order."""
    c = config.embed_dim
    p = f"h.{i}."
    shapes: Dict[str, Shape] = {
        p + "ln_1.weight": (c,),
        p + "ln_1.bias": (c,),
        p + "attn.c_attn.weight": (c, 3 * c),
    }
    if config.qkv_bias:
        shapes[p + "attn.c_attn.bias"] = (3 * c,)
    shapes.update(
        {
            p + "attn.c_proj.weight": (c, c),
            p + "attn.c_proj.bias": (c,),
            p + "ln_2.weight": (c,),
            p + "ln_2.bias": (c,),
            p + "mlp.c_fc.weight": (c, 4 * c),
            p + "mlp.c_fc.bias": (4 * c,),
            p + "mlp.c_proj.weight": (4 * c, c),
            p + "mlp.c_proj.bias": (c,),
        }
    )
    return shapes


def param_shapes(config: GPTConfig) -> Dict[str, Shape]:
    """Every canonical key and its shape, in checkpoint order."""
    shapes: Dict[str, Shape] = {
        "wte.weight": (config.vocab_size, config.embed_dim),
        "wpe.weight": (config.context_length, config.embed_dim),
    }
    for i in range(config.num_layers):
        shapes.update(block_shapes(config, i))
    shapes["ln_f.weight"] = (config.embed_dim,)
    shapes["ln_f.bias"] = (config.embed_dim,)
    return shapes


def num_params(config: GPTConfig, include_embeddings: bool = True) -> int:
    """Parameter count (the tied head counted once). Without embeddings drops wte and wpe."""
    total = 0
    for key, shape in param_shapes(config).items():
        if not include_embeddings and key in ("wte.weight", "wpe.weight"):
            continue
        total += math.prod(shape)
    return total


def init_params(
    config: GPTConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device | str] = None,
) -> Dict[str, Tensor]:
    """Fresh parameters with GPT-2's initialisation, reproducible from ``seed``.

    Weights and embeddings ~ N(0, 0.02); the two residual projections per block
    (``attn.c_proj``, ``mlp.c_proj``) ~ N(0, 0.02 / sqrt(2 * num_layers)); biases 0;
    layer-norm weights 1 and biases 0.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * config.num_layers)
    params: Dict[str, Tensor] = {}
    for key, shape in param_shapes(config).items():
        if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            t = torch.ones(shape)
        elif key.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            std = residual_std if key.endswith("c_proj.weight") else 0.02
            t = torch.empty(shape).normal_(0.0, std, generator=gen)
        params[key] = t.to(device=device, dtype=dtype)
    return params


def validate_params(params: Mapping[str, Tensor], config: GPTConfig) -> None:
    """Raise ValueError unless ``params`` has exactly the canonical keys and shapes, in one
    weight format (plain, or one of ``gptfn.formats``' schemes with its scales).

    The message lists every missing and unexpected key and every wrong shape, each with
    the expected and actual shape, so one run shows all that is wrong.
    """
    expected = param_shapes(config)
    problems = []
    wte = params.get("wte.weight")
    if isinstance(wte, Tensor) and wte.dtype == torch.uint8:  # int4 packs its matrices
        for key in matrix_keys(config.num_layers):
            problem = int4_problem(key, expected[key])
            if problem:
                problems.append(problem)
            expected[key] = int4_shape(key, expected[key])
    missing = [k for k in expected if k not in params]
    unexpected = [k for k in params if k not in expected and not k.endswith(SCALE_SUFFIX)]
    if missing:
        problems.append(f"missing keys: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short_list(unexpected)}")
    for key, t in params.items():
        if not isinstance(t, Tensor):
            problems.append(f"{key}: expected a tensor, got {type(t).__name__}")
    for key, shape in expected.items():
        t = params.get(key)
        if isinstance(t, Tensor) and tuple(t.shape) != shape:
            problems.append(f"{key}: expected shape {list(shape)}, got {list(t.shape)}")
    if not problems:
        problems = format_problems(params, config.num_layers)
    if problems:
        raise ValueError(
            f"parameters do not match the config ({_describe(config)}): " + "; ".join(problems)
        )


def _short_list(keys, limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _describe(config: GPTConfig) -> str:
    return (
        f"vocab_size={config.vocab_size}, context_length={config.context_length}, "
        f"embed_dim={config.embed_dim}, num_layers={config.num_layers}, "
        f"qkv_bias={config.qkv_bias}"
    )
