"""What the commands (``gptfn``, ``python -m export``) share: ``--dtype``, ``--device`` and
``--model`` / ``--random-init`` turned into torch objects and a model. torch is imported
here, when a command needs it, not when the command line is parsed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from gptfn.config import GPTConfig
from gptfn.modules import GPTModel
from gptfn.weights.resolve import NotCached, looks_like_path

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use float32, float16 or bfloat16")
    return _DTYPES[name]


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
) -> GPTModel:
    """A GPTModel in eval mode from ``--model`` (a path or a name, resolved as
    ``GPTModel.from_pretrained`` resolves it), or seeded random weights for a preset name
    with ``random_init``. ``random_hint`` is how a command says to use random weights
    instead when a named model is not cached (commands spell it differently)."""
    if random_init:
        if Path(model).expanduser().exists() or looks_like_path(model):
            raise ValueError("--random-init takes a preset name, not a checkpoint path")
        net = GPTModel(GPTConfig.from_preset(model), seed=seed).eval()
        return net.to(device=device, dtype=dtype) if (dtype or device) else net
    try:
        return GPTModel.from_pretrained(model, dtype=dtype, device=device)
    except NotCached as e:
        raise NotCached(f"{e}{random_hint}") from None
