"""GPT-2 checkpoints in the hub layout: ``model.safetensors`` + ``config.json``.

This is the loading boundary. What comes in is turned into the one canonical layout
(see ``gptfn.params``) here, once, and checked against the config:

- the ``transformer.`` prefix that ``save_pretrained`` writes is dropped;
- the ``h.{i}.attn.bias`` / ``h.{i}.attn.masked_bias`` causal-mask buffers of old hub files
  are dropped (they are constants, not parameters);
- an ``lm_head.weight`` equal to ``wte.weight`` is dropped (the head is tied); an untied
  one is an error.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from gptfn.config import GPTConfig
from gptfn.fileio import atomic_write_text
from gptfn.params import validate_params
from gptfn.weights.safetensors_io import load_safetensors, save_safetensors

PathLike = Union[str, os.PathLike]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def canonicalize(tensors: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Hub or ``save_pretrained`` keys -> canonical keys (see the module docstring)."""
    out: Dict[str, Tensor] = {}
    for key, t in tensors.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if _MASK_BUFFER.match(name):
            continue
        if name in out:
            raise ValueError(f"checkpoint holds {name!r} twice (with and without 'transformer.')")
        out[name] = t
    head = out.pop("lm_head.weight", None)
    if head is not None:
        wte = out.get("wte.weight")
        if wte is None or wte.shape != head.shape or not torch.equal(wte, head):
            raise ValueError(
                "checkpoint has an lm_head.weight that differs from wte.weight: gptfn ties the "
                "output head to the token embedding and cannot load an untied head"
            )
    return out


def resolve_files(path: PathLike) -> Tuple[list, Path]:
    """The safetensors file(s) and the config.json for a file or directory path."""
    path = Path(path)
    if path.is_dir():
        config = path / CONFIG_NAME
        if (path / WEIGHTS_NAME).is_file():
            files = [path / WEIGHTS_NAME]
        elif (path / INDEX_NAME).is_file():
            files = _shards(path / INDEX_NAME)
        else:
            raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors file or a directory")
        files, config = [path], path.with_name(CONFIG_NAME)
    else:
        raise FileNotFoundError(f"no such file or directory: {path}")
    if not config.is_file():
        raise FileNotFoundError(
            f"{config} not found: gptfn needs the model's config.json beside its weights"
        )
    return files, config


def _shards(index_path: Path) -> list:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path}: not a valid safetensors index ({e})") from None
    return [index_path.parent / name for name in sorted(set(weight_map.values()))]


def load_params(
    path: PathLike,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[torch.device, str]] = None,
) -> Tuple[GPTConfig, Dict[str, Tensor]]:
    """Read a GPT-2 checkpoint: a ``.safetensors`` file with ``config.json`` beside it, a
    directory holding both (the hub's and ``save_pretrained``'s layout), or an OpenAI TF
    release directory (``hparams.json`` + ``model.ckpt.*``; needs ``gptfn[tf]``).

    Returns ``(config, params)`` with canonical keys, checked against the config. With no
    ``dtype``/``device`` the tensors are views of a copy-on-write memory map of the file
    (nothing is read until used); ``dtype=``/``device=`` convert.
    """
    from gptfn.weights.openai_tf import is_tf_checkpoint_dir, load_tf_checkpoint

    if is_tf_checkpoint_dir(path):
        config, params = load_tf_checkpoint(path)
    else:
        files, config_path = resolve_files(path)
        config = GPTConfig.from_json(config_path)
        tensors: Dict[str, Tensor] = {}
        for f in files:
            tensors.update(load_safetensors(f))
        params = canonicalize(tensors)
        try:
            validate_params(params, config)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if dtype is not None or device is not None:
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        params = {k: v.to(device=device, dtype=dtype) for k, v in params.items()}
    return config, params


def save_params(params: Mapping[str, Tensor], path: PathLike, config: GPTConfig) -> Path:
    """Write ``params`` in the canonical layout: ``model.safetensors`` + ``config.json``.

    ``path`` is a directory (created if missing) or a ``.safetensors`` file name (config.json
    goes beside it). HF transformers' ``GPT2LMHeadModel.from_pretrained`` reads the result.
    Each file is written atomically. Returns the directory.
    """
    validate_params(params, config)
    path = Path(path)
    if path.suffix == ".safetensors":
        weights, directory = path, path.parent
        if not directory.is_dir():
            raise FileNotFoundError(f"directory does not exist: {directory}")
    else:
        directory = path
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / WEIGHTS_NAME
    save_safetensors(params, weights, metadata={"format": "pt"})
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config.to_hf_dict(), indent=2) + "\n")
    return directory
