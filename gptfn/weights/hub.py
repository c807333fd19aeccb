"""GPT-2 checkpoints in the hub layout: ``model.safetensors`` + ``config.json``.

This is the loading boundary. What comes in is turned into the one canonical layout
(see ``gptfn.params``) here, once, and checked against the config:

- the ``transformer.`` prefix that ``save_pretrained`` writes is dropped;
- the ``h.{i}.attn.bias`` / ``h.{i}.attn.masked_bias`` causal-mask buffers of old hub files
  are dropped (they are constants, not parameters);
- an ``lm_head.weight`` equal to ``wte.weight`` is dropped (the head is tied); an untied
  one is an error.

A saved model is one unit. ``save_params`` writes both files to temporary names first and
renames ``model.safetensors`` before ``config.json``; the weights carry their own config and a
save id in their metadata, and ``config.json`` carries the same id. A save cut between the
two renames (a full disk, a kill -9) leaves new weights beside the old config.json, and the
new config.json whole under its temporary name: ``load_params`` sees the ids differ and the
temporary file with the weights' id, and takes the config saved with the weights, with a
warning. Every other failure leaves the old pair untouched.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from gptfn.config import GPTConfig
from gptfn.fileio import write_together
from gptfn.formats import quantization_entry, scheme_of
from gptfn.params import validate_params
from gptfn.weights.safetensors_io import load_safetensors, read_header, write_safetensors

PathLike = Union[str, os.PathLike]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
SAVE_ID = "gptfn_save_id"  # in config.json and in the weights' metadata: one save
SAVED_CONFIG = "gptfn_config"  # the weights' metadata: the config.json they were saved with

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
    path = Path(path).expanduser()
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
        config = _cut_save_config(files, config)
    return files, config


def _cut_save_config(files: list, config: Path) -> Path:
    """Where config.json is missing because a save was cut just before renaming it: the
    whole config.json it left under its temporary name (its save id is the weights')."""
    save_id = None
    if len(files) == 1 and files[0].is_file():
        save_id = read_header(files[0])[2].get(SAVE_ID)
    cut = [t for t in sorted(config.parent.glob(f".{CONFIG_NAME}.*.tmp"))
           if save_id is not None and _save_id(t) == save_id]
    if not cut:
        raise FileNotFoundError(
            f"{config} not found: gptfn needs the model's config.json beside its weights")
    warnings.warn(f"{config} is missing (a save was cut off before it wrote config.json): "
                  f"using the config saved with {files[0].name}", stacklevel=4)
    return cut[0]


def _shards(index_path: Path) -> list:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ValueError(f"{index_path}: not a valid safetensors index ({e})") from None
    for name in names:
        # a name read from a file may only point at a file beside it
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"{index_path}: shard {name!r} is not a file name in its directory")
    return [index_path.parent / name for name in names]


def _config_of(config_path: Path, weights: list) -> GPTConfig:
    """config.json's config, unless a save was cut between its two renames: then the config
    saved with the weights, with a warning (see the module docstring)."""
    config = GPTConfig.from_json(config_path)
    if len(weights) != 1:
        return config
    _, _, metadata = read_header(weights[0])
    saved, save_id = metadata.get(SAVED_CONFIG), metadata.get(SAVE_ID)
    if saved is None or save_id is None or _save_id(config_path) == save_id:
        return config
    # config.json is from another save. Only a cut save leaves the weights' own config.json
    # beside it, whole, under its temporary name; without one, config.json was replaced
    # on purpose and stays in charge.
    if not any(_save_id(t) == save_id for t in config_path.parent.glob(f".{CONFIG_NAME}.*.tmp")):
        return config
    try:
        own = GPTConfig.from_dict(json.loads(saved))
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{weights[0]}: the config saved in its metadata is invalid "
                         f"({e})") from None
    warnings.warn(f"{config_path} is older than {weights[0].name} (a save was cut off before "
                  "it wrote config.json): using the config saved with the weights", stacklevel=3)
    return own


def _save_id(config_path: Path) -> Optional[str]:
    try:
        doc = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return doc.get(SAVE_ID) if isinstance(doc, dict) else None


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

    path = Path(path).expanduser()
    if is_tf_checkpoint_dir(path):
        config, params = load_tf_checkpoint(path)
    else:
        files, config_path = resolve_files(path)
        config = _config_of(config_path, files)
        tensors: Dict[str, Tensor] = {}
        for f in files:
            tensors.update(load_safetensors(f))
        params = canonicalize(tensors)
        try:
            validate_params(params, config)
            _check_recorded_format(config_path, params)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    scheme = scheme_of(params)
    if scheme is not None:
        if dtype not in (None, torch.float32):
            raise ValueError(f"{path} holds weights in the {scheme} format, which computes in "
                             f"fp32: dtype {dtype} does not apply")
        dtype = None
    if dtype is not None or device is not None:
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        params = {k: v.to(device=device, dtype=dtype) for k, v in params.items()}
    return config, params


def _check_recorded_format(config_path: Path, params: Mapping[str, Tensor]) -> None:
    """Raise ValueError unless the format ``config.json`` records is the weights' own."""
    try:
        doc = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # GPTConfig.from_json has read it already; a race is not this check's
    entry = doc.get("quantization") if isinstance(doc, dict) else None
    recorded = entry.get("scheme") if isinstance(entry, dict) else entry
    actual = scheme_of(params)
    if recorded != actual:
        raise ValueError(f"config.json records the weight format {recorded or 'plain'}, the "
                         f"weights are {actual or 'plain'}")


def save_params(params: Mapping[str, Tensor], path: PathLike, config: GPTConfig) -> Path:
    """Write ``params`` in the canonical layout: ``model.safetensors`` + ``config.json``.

    ``path`` is a directory (created if missing) or a ``.safetensors`` file name (config.json
    goes beside it). HF transformers' ``GPT2LMHeadModel.from_pretrained`` reads the result.
    The two files are one unit (see the module docstring). Returns the directory.
    """
    validate_params(params, config)
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        weights, directory = path, path.parent
        if not directory.is_dir():
            raise FileNotFoundError(f"directory does not exist: {directory}")
    else:
        directory = path
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / WEIGHTS_NAME
    save_id = uuid.uuid4().hex
    scheme = scheme_of(params)
    recorded = {"quantization": quantization_entry(scheme)} if scheme else {}
    config_text = json.dumps(config.to_hf_dict() | recorded | {SAVE_ID: save_id}, indent=2)
    config_text += "\n"
    metadata = {"format": "pt", SAVE_ID: save_id, SAVED_CONFIG: config_text}
    write_together([
        (weights, lambda tmp: write_safetensors(params, tmp, metadata)),
        (directory / CONFIG_NAME, lambda tmp: tmp.write_text(config_text, encoding="utf-8")),
    ])
    return directory
