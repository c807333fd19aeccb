"""Resumable training checkpoints in safetensors + JSON (no pickle anywhere).

A run directory holds ``checkpoint.json``, which names the latest complete checkpoint
directory ``ckpt-{step:08d}/``:

- ``model.safetensors`` + ``config.json``: the parameters, in the layout ``save_params``
  writes (so a checkpoint also loads with ``GPTModel.from_pretrained``);
- ``optimizer.safetensors``: every tensor of the optimizer state, keyed
  ``{param_name}.{state_key}``;
- ``state.json``: step, tokens seen, the optimizer's param groups (without the parameters),
  the training settings, and anything else the trainer passes;
- ``rng.safetensors``: the CPU (and CUDA) generator states.

Saving writes a new directory, then replaces ``checkpoint.json`` atomically, then deletes
the previous checkpoint: a crash at any point leaves ``checkpoint.json`` naming a whole
checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from gptfn.config import GPTConfig
from gptfn.fileio import atomic_write_text
from gptfn.params import param_shapes
from gptfn.weights import load_params, save_params
from gptfn.weights.safetensors_io import SafetensorsError, load_safetensors, save_safetensors

POINTER = "checkpoint.json"


@dataclass
class Checkpoint:
    config: GPTConfig
    params: Dict[str, Tensor]
    optimizer_state: Dict[str, Any]  # torch.optim state_dict layout
    state: Dict[str, Any]  # step, tokens, settings, ...
    rng: Dict[str, Tensor]
    path: Path


def _param_names(model: nn.Module) -> List[str]:
    return [name for name, _ in model.named_parameters()]


def save_checkpoint(
    run_dir: Union[str, os.PathLike],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: GPTConfig,
    state: Dict[str, Any],
) -> Path:
    """Write a checkpoint of ``model``, ``optimizer``, the RNG states and ``state`` (which
    must hold ``step``); returns its directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    final = run_dir / f"ckpt-{step:08d}"
    tmp = run_dir / f".ckpt-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    names = _param_names(model)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    save_params(params, tmp, config)
    opt = optimizer.state_dict()
    tensors: Dict[str, Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{names[index]}.{key}"] = value
            else:
                scalars.setdefault(names[index], {})[key] = value
    save_safetensors(tensors, tmp / "optimizer.safetensors")
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[i] for i in g["params"]]}
              for g in opt["param_groups"]]
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_safetensors(rng, tmp / "rng.safetensors")
    doc = {"state": state, "param_groups": groups, "optimizer_scalars": scalars}
    atomic_write_text(tmp / "state.json", json.dumps(doc, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    previous = _pointed(run_dir)
    atomic_write_text(run_dir / POINTER, json.dumps({"latest": final.name, "step": step}) + "\n")
    if previous is not None and previous != final and previous.exists():
        shutil.rmtree(previous)
    return final


def _pointed(run_dir: Path) -> Optional[Path]:
    pointer = run_dir / POINTER
    if not pointer.is_file():
        return None
    try:
        return run_dir / json.loads(pointer.read_text())["latest"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{pointer} is corrupt ({e})") from None


def has_checkpoint(run_dir: Union[str, os.PathLike]) -> bool:
    return (Path(run_dir) / POINTER).is_file()


def load_checkpoint(run_dir: Union[str, os.PathLike]) -> Checkpoint:
    """The checkpoint ``checkpoint.json`` names, checked; errors name what is wrong."""
    run_dir = Path(run_dir)
    path = _pointed(run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir} (no {POINTER})")
    try:
        config, params = load_params(path)
        tensors = load_safetensors(path / "optimizer.safetensors")
        rng = load_safetensors(path / "rng.safetensors")
        doc = json.loads((path / "state.json").read_text(encoding="utf-8"))
        groups, scalars, state = doc["param_groups"], doc["optimizer_scalars"], doc["state"]
    except (SafetensorsError, json.JSONDecodeError, KeyError, UnicodeDecodeError,
            FileNotFoundError) as e:
        raise ValueError(f"checkpoint {path} is corrupt or incomplete: {e}") from None
    names = list(param_shapes(config))  # canonical order = GPTModel.named_parameters order
    index = {n: i for i, n in enumerate(names)}
    opt_state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, sub = key.rpartition(".")
        if name not in index:
            raise ValueError(f"checkpoint {path}: optimizer state for unknown parameter {name}")
        opt_state.setdefault(index[name], {})[sub] = value
    for name, entry in scalars.items():
        opt_state.setdefault(index[name], {}).update(entry)
    param_groups = [g | {"params": [index[n] for n in g["params"]]} for g in groups]
    return Checkpoint(config, params, {"state": opt_state, "param_groups": param_groups},
                      state, rng, path)


def restore_rng(rng: Dict[str, Tensor]) -> None:
    torch.set_rng_state(rng["cpu"].clone())  # a standalone tensor, not a view of the file
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda{i}"].clone(), i)
