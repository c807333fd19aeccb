"""Writing artifacts: TorchScript (.pt), torch.export (.pt2), AOTInductor packages (.pt2).

Every artifact is written under a temporary name in the target directory, verified against
eager gptfn (``export.verify``), and only then renamed to its final name; a failed export
or a failed check leaves nothing under the final name.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import Tensor

from export.artifact import DecodeStep, ScriptableGPT
from gptfn.config import GPTConfig
from gptfn.scripting import script

KINDS = ("torchscript", "pt2", "aoti")
# torch.jit.save/load of a scripted module warn like torch.jit.script does
_JIT_DEPRECATED = r"`torch\.jit\.(save|load|script)` is deprecated"


def check_request(config: GPTConfig, out: Path, max_seq_len: int, device: torch.device,
                  dtype: torch.dtype) -> None:
    """The errors a user can cause, before any work."""
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {out.parent}")
    if not 1 <= max_seq_len <= config.context_length:
        raise ValueError(
            f"max_seq_len {max_seq_len} must be in [1, context_length {config.context_length}]"
        )
    if device.type == "cpu" and dtype in (torch.float16,):
        raise ValueError("float16 on the CPU is not supported for export: use float32 or bfloat16")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no CUDA GPU here")


def _temp_path(out: Path, suffix: str = "") -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp" + suffix, dir=out.parent)
    os.close(fd)
    return Path(name)


def save_torchscript(config: GPTConfig, params: Dict[str, Tensor], path: Path,
                     max_seq_len: int) -> None:
    module = script(ScriptableGPT(config, params, max_seq_len))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED)
        module.save(str(path))


def load_torchscript(path: Path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED)
        return torch.jit.load(str(path))


def export_forward(model, config: GPTConfig, max_seq_len: int, device):
    """torch.export of ``model.forward`` with dynamic batch and sequence length."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=1, max=max_seq_len)
    example = torch.zeros(2, min(8, max_seq_len), dtype=torch.long, device=device)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes={"idx": {0: batch, 1: seq}})


def export_decode(config: GPTConfig, params: Dict[str, Tensor], max_seq_len: int, device):
    """torch.export of one decode step (static shapes: batch 1, ``max_seq_len`` cache slots)."""
    step = DecodeStep(config, params).eval()
    cache = torch.zeros(config.num_layers, 1, config.num_heads, max_seq_len, config.head_dim,
                        dtype=params["wte.weight"].dtype, device=device)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():
        return torch.export.export(step, (token, cache, cache.clone(), pos))


def decode_package_path(out: Path) -> Path:
    """Where the AOTInductor decode-step package of forward package ``out`` goes."""
    return out.with_name(out.stem + ".decode" + out.suffix)


def build(kind: str, model, out: Path, max_seq_len: int,
          verify: Callable[[str, List[Path]], dict]) -> dict:
    """Write artifact(s) of ``kind`` for ``model`` at ``out`` (verified before renaming)."""
    from gptfn.generation import model_parts

    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; use one of {', '.join(KINDS)}")
    config, params = model_parts(model)
    device = params["wte.weight"].device
    temps: List[Path] = []
    finals: List[Path] = []
    try:
        if kind == "torchscript":
            tmp = _temp_path(out)
            temps.append(tmp)
            save_torchscript(config, params, tmp, max_seq_len)
            finals.append(out)
        elif kind == "pt2":
            tmp = _temp_path(out, ".pt2")
            temps.append(tmp)
            torch.export.save(export_forward(model, config, max_seq_len, device), str(tmp))
            finals.append(out)
        else:
            fwd, dec = _temp_path(out, ".pt2"), _temp_path(decode_package_path(out), ".pt2")
            temps += [fwd, dec]
            torch._inductor.aoti_compile_and_package(
                export_forward(model, config, max_seq_len, device), package_path=str(fwd))
            torch._inductor.aoti_compile_and_package(
                export_decode(config, params, max_seq_len, device), package_path=str(dec))
            finals += [out, decode_package_path(out)]
        report = verify(kind, temps)
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
        report["artifacts"] = [str(f) for f in finals]
        return report
    finally:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
