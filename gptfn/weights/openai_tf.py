"""OpenAI's GPT-2 TensorFlow checkpoints -> canonical params.

A release directory holds ``hparams.json`` (``n_vocab``, ``n_ctx``, ``n_embd``, ``n_head``,
``n_layer``) and a TF checkpoint (``checkpoint``, ``model.ckpt.index``,
``model.ckpt.data-*``, ``model.ckpt.meta``). The checkpoint read is always ``model.ckpt`` in
that directory: the ``checkpoint`` pointer file is ignored, so that one naming a path elsewhere
(absolute, or ``../``) makes nothing outside the directory read. Variable names map onto
canonical keys as

    model/wte                      -> wte.weight                  [V, C]
    model/wpe                      -> wpe.weight                  [T_max, C]
    model/h{i}/ln_1/g, /b          -> h.{i}.ln_1.weight, .bias
    model/h{i}/attn/c_attn/w, /b   -> h.{i}.attn.c_attn.weight    [1, C, 3C] -> [C, 3C]
    model/h{i}/attn/c_proj/w, /b   -> h.{i}.attn.c_proj.weight    [1, C, C]  -> [C, C]
    model/h{i}/ln_2/g, /b          -> h.{i}.ln_2.weight, .bias
    model/h{i}/mlp/c_fc/w, /b      -> h.{i}.mlp.c_fc.weight       [1, C, 4C] -> [C, 4C]
    model/h{i}/mlp/c_proj/w, /b    -> h.{i}.mlp.c_proj.weight     [1, 4C, C] -> [4C, C]
    model/ln_f/g, /b               -> ln_f.weight, .bias

(the Conv1D weights lose their leading 1 and are not transposed: OpenAI's layout is
gptfn's). TensorFlow is imported here, lazily: install the extra ``gptfn[tf]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Tuple, Union

import torch
from torch import Tensor

from gptfn.config import GPTConfig
from gptfn.params import param_shapes

CHECKPOINT_FILES = ("hparams.json", "model.ckpt.index")


def is_tf_checkpoint_dir(path: Union[str, os.PathLike]) -> bool:
    path = Path(path).expanduser()
    return path.is_dir() and all((path / f).is_file() for f in CHECKPOINT_FILES)


def tf_name(key: str) -> str:
    """The OpenAI variable name of canonical key ``key``."""
    parts = key.split(".")
    leaf = {"weight": "g", "bias": "b"}
    if parts[0] in ("wte", "wpe"):
        return f"model/{parts[0]}"
    if parts[0] == "ln_f":
        return f"model/ln_f/{leaf[parts[1]]}"
    # h.{i}.ln_1.weight | h.{i}.attn.c_attn.weight ...
    i, rest = parts[1], parts[2:]
    if rest[0].startswith("ln_"):
        return f"model/h{i}/{rest[0]}/{leaf[rest[1]]}"
    return f"model/h{i}/{rest[0]}/{rest[1]}/{'w' if rest[2] == 'weight' else 'b'}"


def load_tf_checkpoint(path: Union[str, os.PathLike]) -> Tuple[GPTConfig, Dict[str, Tensor]]:
    """(config, canonical params) of an OpenAI GPT-2 release directory."""
    path = Path(path).expanduser()
    if not is_tf_checkpoint_dir(path):
        raise FileNotFoundError(
            f"{path} is not an OpenAI GPT-2 checkpoint directory (needs "
            f"{' and '.join(CHECKPOINT_FILES)})"
        )
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError(
            "reading OpenAI TF checkpoints needs TensorFlow: pip install 'gptfn[tf]'"
        ) from None
    config = GPTConfig.from_json(path / "hparams.json")
    # the checkpoint in the directory itself (the files is_tf_checkpoint_dir checked): TF's
    # ``checkpoint`` pointer file is not read, as it may name any path (absolute, ``../``)
    prefix = str(path / "model.ckpt")
    try:
        reader = tf.train.load_checkpoint(prefix)
    except Exception as e:  # TF raises its own error types for unreadable checkpoints
        raise ValueError(f"{path}: cannot read the TF checkpoint {prefix}: {e}") from None
    available = reader.get_variable_to_shape_map()
    params: Dict[str, Tensor] = {}
    problems = []
    for key, shape in param_shapes(config).items():
        name = tf_name(key)
        if name not in available:
            problems.append(f"missing variable {name} (for {key})")
            continue
        have = list(available[name])
        if len(have) == len(shape) + 1 and have[0] == 1:
            have = have[1:]  # Conv1D weights: [1, in, out] -> [in, out]
        if tuple(have) != shape:
            problems.append(
                f"variable {name} has shape {list(available[name])}, expected {list(shape)} "
                f"(or [1, ...]) for {key}"
            )
            continue
        params[key] = torch.from_numpy(reader.get_tensor(name).reshape(shape))
    if problems:
        raise ValueError(f"{path}: checkpoint does not match hparams.json: " + "; ".join(problems))
    return config, params
