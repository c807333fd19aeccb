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

Saving writes a new directory under a temporary name, renames it, then replaces
``checkpoint.json`` atomically, then deletes the other checkpoints: a crash at any point
leaves ``checkpoint.json`` naming a whole checkpoint.

``checkpoint.json`` is read from disk, so it is not trusted: its ``latest`` must be the name
of a checkpoint directory inside the run directory (``ckpt-`` and eight digits, the same step
as its ``step``), or loading stops with an error. Nothing gptfn deletes is taken from a
file: it deletes only entries of the run directory whose names it makes itself, never
through a symbolic link.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from gptfn.checks import is_int, is_number
from gptfn.config import GPTConfig
from gptfn.fileio import atomic_write_text, fsync_dir
from gptfn.params import param_shapes
from gptfn.weights import load_params, save_params
from gptfn.weights.safetensors_io import SafetensorsError, load_safetensors, save_safetensors

POINTER = "checkpoint.json"
_CKPT = re.compile(r"ckpt-(\d{8})")
_CKPT_TMP = re.compile(r"\.ckpt-\d{8}\.tmp")
_ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# 2: optimizer state keyed by the true parameter names. Before it, keys paired the
# optimizer's indices with the model's order; such checkpoints load as they always did.
STATE_FORMAT = 2


@dataclass
class Checkpoint:
    config: GPTConfig
    params: Dict[str, Tensor]
    optimizer_state: Dict[str, Any]  # torch.optim state_dict layout
    state: Dict[str, Any]  # step, tokens, settings, ...
    rng: Dict[str, Tensor]
    path: Path


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[str]:
    """The parameter name for each index of ``optimizer.state_dict()``: indices count the
    parameters in param-group order, not in the model's order."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


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
    remove_entry(tmp, run_dir)
    tmp.mkdir()
    names = _optimizer_names(model, optimizer)
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
    groups = [{k: v for k, v in g.items() if k != "params"}
              | {"params": [names[i] for i in g["params"]]}
              for g in opt["param_groups"]]
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_safetensors(rng, tmp / "rng.safetensors")
    doc = {"format": STATE_FORMAT, "state": state, "param_groups": groups,
           "optimizer_scalars": scalars}
    atomic_write_text(tmp / "state.json", json.dumps(doc, indent=2) + "\n")
    fsync_dir(tmp)
    remove_entry(final, run_dir)  # a checkpoint of this step that a killed run left
    os.replace(tmp, final)
    atomic_write_text(run_dir / POINTER, json.dumps({"latest": final.name, "step": step}) + "\n")
    for entry in run_dir_entries(run_dir):
        if entry != final and (_CKPT.fullmatch(entry.name) or _CKPT_TMP.fullmatch(entry.name)):
            remove_entry(entry, run_dir)
    return final


def run_dir_entries(run_dir: Path) -> List[Path]:
    return sorted(run_dir.iterdir()) if run_dir.is_dir() else []


def remove_entry(path: Path, run_dir: Path) -> None:
    """Delete ``path``, a direct child of ``run_dir``: a directory tree, a file, or a symbolic
    link (the link itself, never what it points to). Anything else is refused."""
    if path.parent != run_dir or path.name in ("", ".", ".."):
        raise ValueError(f"refusing to delete {path}: not an entry of {run_dir}")
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _pointed(run_dir: Path) -> Optional[Path]:
    """The latest checkpoint: the one ``checkpoint.json`` names, checked (see the module
    docstring), or a newer one that a save cut before it rewrote ``checkpoint.json`` left
    (a checkpoint directory takes its name only when whole)."""
    named = _named(run_dir)
    newest = max((e for e in run_dir_entries(run_dir)
                  if _CKPT.fullmatch(e.name) and e.is_dir() and not e.is_symlink()),
                 key=lambda e: e.name, default=None)
    if named is None or (newest is not None and newest.name > named.name):
        return newest
    return named


def _named(run_dir: Path) -> Optional[Path]:
    pointer = run_dir / POINTER
    if not pointer.is_file():
        return None
    try:
        doc = json.loads(pointer.read_text(encoding="utf-8"))
        latest, step = doc["latest"], doc["step"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"{pointer} is corrupt ({type(e).__name__}: {e})") from None
    match = _CKPT.fullmatch(latest) if isinstance(latest, str) else None
    if match is None:
        raise ValueError(
            f"{pointer} names {latest!r} as the latest checkpoint, but a checkpoint must be a "
            f"directory ckpt-NNNNNNNN inside {run_dir}: refusing to use it")
    if not is_int(step) or int(match.group(1)) != step:
        raise ValueError(f"{pointer} is corrupt: step {step!r} does not match {latest}")
    path = run_dir / latest
    if path.is_symlink() or not path.is_dir():
        raise ValueError(f"{pointer} names {latest}, but {path} is not a checkpoint directory")
    return path


def has_checkpoint(run_dir: Union[str, os.PathLike]) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / POINTER).is_file() or any(
        _CKPT.fullmatch(e.name) and e.is_dir() and not e.is_symlink()
        for e in run_dir_entries(run_dir))


def load_checkpoint(run_dir: Union[str, os.PathLike]) -> Checkpoint:
    """The checkpoint ``checkpoint.json`` names, checked; errors name the file and what is
    wrong with it."""
    run_dir = Path(run_dir)
    path = _pointed(run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir} (no {POINTER}, no ckpt-NNNNNNNN)")
    try:
        config, params = load_params(path)
    except (SafetensorsError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"checkpoint {path}: the model is unreadable: {e}") from None
    state, groups, scalars, labelled = _read_state(path / "state.json", path)
    rng = _read_rng(path / "rng.safetensors")
    names = list(param_shapes(config))
    for g in groups:
        _check_group(g, dict.fromkeys(names, 0), path / "state.json")
    if labelled:  # the optimizer's index order: its groups' parameters, in turn
        names = [n for g in groups if isinstance(g, dict) for n in g.get("params", [])]
        if sorted(names) != sorted(param_shapes(config)):
            raise ValueError(f"{path / 'state.json'}: the param groups do not list every "
                             "parameter once")
    index = {n: i for i, n in enumerate(names)}
    opt_state = _read_optimizer(path / "optimizer.safetensors", params if labelled else None,
                                index, scalars)
    param_groups = []
    for g in groups:
        param_groups.append(g | {"params": [index[n] for n in g["params"]]})
    return Checkpoint(config, params, {"state": opt_state, "param_groups": param_groups},
                      state, rng, path)


def _check_group(g: Any, index: Dict[str, int], file: Path) -> None:
    """A saved AdamW param group: parameter names and numeric hyper-parameters."""
    if not isinstance(g, dict) or not isinstance(g.get("params"), list):
        raise ValueError(f"{file}: a param group is not an object with a list of parameters")
    unknown = [n for n in g["params"] if not isinstance(n, str) or n not in index]
    if unknown:
        raise ValueError(f"{file}: a param group names unknown parameters {unknown[:3]!r}")
    for key in ("lr", "weight_decay", "eps"):
        if key in g and not is_number(g[key]):
            raise ValueError(f"{file}: param group {key} is {g[key]!r}, not a number")
    betas = g.get("betas", (0.9, 0.999))
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
            is_number(b) for b in betas):
        raise ValueError(f"{file}: param group betas is {betas!r}, not two numbers")


def _read_state(file: Path, path: Path):
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
        state, groups, scalars = doc["state"], doc["param_groups"], doc["optimizer_scalars"]
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} is incomplete: {file.name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"{file} is corrupt ({type(e).__name__}: {e})") from None
    if (not isinstance(state, dict) or not isinstance(groups, list) or not isinstance(scalars, dict)
            or not isinstance(state.get("settings", {}), dict)
            or not isinstance(state.get("data", {}), dict)):
        raise ValueError(f"{file} is corrupt: state, param_groups or optimizer_scalars has "
                         "the wrong type")
    for key in ("step", "tokens"):
        value = state.get(key)
        if not is_int(value) or value < 0:
            raise ValueError(f"{file} is corrupt: {key} is {value!r}, not a count")
    if f"ckpt-{state['step']:08d}" != path.name:
        raise ValueError(f"{file} is corrupt: step {state['step']} in {path.name}")
    return state, groups, scalars, doc.get("format") == STATE_FORMAT


def _read_rng(file: Path) -> Dict[str, Tensor]:
    try:
        rng = load_safetensors(file)
    except (SafetensorsError, FileNotFoundError) as e:
        raise ValueError(f"checkpoint RNG state {file} is unreadable: {e}") from None
    if "cpu" not in rng:
        raise ValueError(f"{file} holds no CPU generator state ('cpu')")
    try:
        torch.Generator().set_state(rng["cpu"].clone())
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{file}: 'cpu' is not a CPU generator state ({e})") from None
    return rng


def _read_optimizer(file: Path, params: Optional[Dict[str, Tensor]], index: Dict[str, int],
                    scalars: Dict[str, Any]) -> Dict[int, Dict[str, Any]]:
    """The optimizer state by index; with ``params``, each moment is checked against the
    shape of the parameter it names."""
    try:
        tensors = load_safetensors(file)
    except (SafetensorsError, FileNotFoundError) as e:
        raise ValueError(f"checkpoint optimizer state {file} is unreadable: {e}") from None
    opt_state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, sub = key.rpartition(".")
        if name not in index:
            raise ValueError(f"{file}: optimizer state for unknown parameter {name!r}")
        if params is not None and sub in _ADAM_STATE and (
                value.shape != params[name].shape or not value.is_floating_point()):
            raise ValueError(
                f"{file}: {key} has shape {tuple(value.shape)} and dtype {value.dtype}, but the "
                f"parameter has shape {tuple(params[name].shape)}")
        if sub == "step" and value.numel() != 1:
            raise ValueError(f"{file}: {key} should hold one number, has shape "
                             f"{tuple(value.shape)}")
        opt_state.setdefault(index[name], {})[sub] = value
    for name, entry in scalars.items():
        if name not in index or not isinstance(entry, dict) or not all(
                is_number(v) for v in entry.values()):
            raise ValueError(f"{file.with_name('state.json')}: bad optimizer scalars for {name!r}")
        opt_state.setdefault(index[name], {}).update(entry)
    return opt_state


def restore_rng(rng: Dict[str, Tensor]) -> None:
    torch.set_rng_state(rng["cpu"].clone())  # a standalone tensor, not a view of the file
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda{i}"].clone(), i)
