"""From a name or a path to a model: where gptfn looks for weights, and what it says when
there are none.

``--model`` is a checkpoint path (a directory with model.safetensors + config.json, or a
.safetensors file) or a preset name (``gpt2``, ``gpt2-medium``, ... or ``124M`` ...), whose
pretrained weights are looked up in the cache directory: ``$GPTFN_CACHE_DIR``, else
``$XDG_CACHE_HOME/gptfn``, else ``~/.cache/gptfn``; the files of the hub repository
``openai-community/NAME`` go in ``CACHE/hf/openai-community/NAME/``. Random weights are
used only when asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from gptfn.config import PRESET_ALIASES, PRESETS, GPTConfig

HF_REPOS = {name: f"openai-community/{name}" for name in PRESETS}


def cache_dir() -> Path:
    """gptfn's cache directory (see the module docstring)."""
    if os.environ.get("GPTFN_CACHE_DIR"):
        return Path(os.environ["GPTFN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gptfn"


def pretrained_dir(name: str) -> Path:
    """Where the hub files of preset ``name`` live in the cache."""
    key = PRESET_ALIASES.get(name, name)
    if key not in HF_REPOS:
        known = ", ".join(list(PRESETS) + list(PRESET_ALIASES))
        raise ValueError(f"unknown model name {name!r}; known names: {known}")
    return cache_dir() / "hf" / HF_REPOS[key]


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
              "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; use float32, float16 or bfloat16")
    return dtypes[name]


def parse_device(name: Optional[str]) -> torch.device:
    """``None`` or ``auto``: CUDA when available, else CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU here")
    return device


def load_model(
    model: str,
    random_init: bool = False,
    seed: int = 0,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    random_hint: str = ", or pass --random-init to use random weights",
):
    """A GPTModel in eval mode from a path or a preset name (see the module docstring).
    ``random_hint`` is how the error for a name with no cached weights says to use random
    weights instead (commands spell it differently)."""
    from gptfn.modules import GPTModel

    path = Path(model).expanduser()
    if not path.exists() and _looks_like_path(model):
        known = ", ".join(list(PRESETS) + list(PRESET_ALIASES))
        raise FileNotFoundError(f"no such checkpoint file or directory: {path} (and {model!r} "
                                f"is not a model name: {known})")
    if path.exists():
        if random_init:
            raise ValueError("--random-init takes a preset name, not a checkpoint path")
        net = GPTModel.from_pretrained(path, dtype=dtype, device=device)
    elif random_init:
        net = GPTModel(GPTConfig.from_preset(model), seed=seed).eval()
        net = net.to(device=device, dtype=dtype) if (dtype or device) else net
    else:
        where = pretrained_dir(model)
        if not (where / "model.safetensors").is_file() or not (where / "config.json").is_file():
            raise FileNotFoundError(
                f"no pretrained weights for {model!r} in {where}: download them with "
                f"`gptfn download {model}` (or set GPTFN_CACHE_DIR to a cache that has them), "
                f"or give a checkpoint path instead{random_hint}"
            )
        net = GPTModel.from_pretrained(where, dtype=dtype, device=device)
    return net


def _looks_like_path(text: str) -> bool:
    """A --model value that can only mean a file: it has a directory part, starts with ``.``
    or ``~``, or ends like a weights or config file."""
    return ("/" in text or os.sep in text or text.startswith((".", "~"))
            or text.endswith((".safetensors", ".json", ".bin", ".pt")))
