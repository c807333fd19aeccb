"""Writing artifacts: TorchScript (.pt), torch.export (.pt2), AOTInductor packages (.pt2).

Every artifact is written under a temporary name in the target directory, verified against
eager gptfn (``export.verify``), and only then renamed to its final name, with its report
(``OUT.report.json``) as one unit (``export.commit``): a failed build or check leaves the
previous artifacts and report as they were.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from export.artifact import ScriptableGPT
from export.commit import commit, remove_stale_temps, report_path, temp_path
from gptfn.config import GPTConfig
from gptfn.fileio import errors_naming
from gptfn.scripting import script

KINDS = ("torchscript", "pt2", "aoti")
# torch.jit.save/load of a scripted module warn like torch.jit.script does
_JIT_DEPRECATED = r"`torch\.jit\.(save|load|script)` is deprecated"
# AOTInductor's own use of a pytree API it deprecates (torch 2.13): nothing a caller can change
_TREESPEC_DEPRECATED = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def check_request(config: GPTConfig, out: Path, max_seq_len: int, device: torch.device,
                  dtype: torch.dtype) -> None:
    """The errors a user can cause, before any work."""
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {out.parent}")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory: give the artifact's file path")
    if not 1 <= max_seq_len <= config.context_length:
        raise ValueError(
            f"max_seq_len {max_seq_len} must be in [1, context_length {config.context_length}]"
        )
    if device.type == "cpu" and dtype in (torch.float16,):
        raise ValueError("float16 on the CPU is not supported for export: use float32 or bfloat16")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no CUDA GPU here")


def save_torchscript(config: GPTConfig, params: Dict[str, Tensor], path: Path,
                     max_seq_len: int) -> None:
    module = script(ScriptableGPT(config, params, max_seq_len))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED)
        data = module.save_to_buffer()
    write_bytes(path, data)


def write_bytes(path: Path, data) -> None:
    """Write ``data`` (bytes, or a buffer: a TorchScript module serializes itself to one)
    to ``path`` with Python's file I/O, so that a failed write (a full disk) is an OSError
    naming the file."""
    with errors_naming(path), open(path, "wb") as fh:
        fh.write(data)


class _Sink(io.RawIOBase):
    """A file for torch's archive writer that never raises into it: the first failed write
    (a full disk) is kept and every later one dropped, so the writer finishes and the error
    is raised after it, in Python. An exception raised inside the writer's callback reaches
    its C++ destructor, which aborts the whole process (no exception, no clean-up)."""

    def __init__(self, fh):
        super().__init__()
        self.fh, self.error = fh, None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.fh.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.fh.seek(offset, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.fh.write(data)
            except OSError as e:
                self.error = e
        return memoryview(data).nbytes


def write_streamed(path: Path, save: Callable[[object], object]) -> None:
    """``save(f)`` straight into ``path`` (torch.export.save, AOTInductor's package_aoti):
    the archive is not held in memory, where it would be one more copy of the weights, and
    a failed write is an OSError naming the file (see ``_Sink``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TREESPEC_DEPRECATED, category=FutureWarning)
        with errors_naming(path), open(path, "wb") as fh:
            sink = _Sink(fh)
            try:
                save(sink)
            finally:  # the failed write is the cause of whatever the writer then raised
                if sink.error is not None:
                    raise sink.error


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


def artifact_paths(kind: str, out: Path) -> List[Path]:
    """The files an export of ``kind`` at ``out`` writes, its report last."""
    return [out, report_path(out)]


def build(kind: str, model, out: Path, max_seq_len: int,
          verify: Callable[[str, List[Path]], dict],
          log: Optional[Callable[[str], None]] = None) -> dict:
    """Write artifact(s) of ``kind`` for ``model`` at ``out`` and their report
    ``OUT.report.json``, as one unit, once verified (see ``export.commit``). ``log`` hears
    a line as each stage starts. Returns the report."""
    from gptfn.generation import model_parts

    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; use one of {', '.join(KINDS)}")
    say = log or (lambda message: None)
    config, params = model_parts(model)
    device = params["wte.weight"].device
    *finals, report_final = artifact_paths(kind, out)
    remove_stale_temps([*finals, report_final])  # what a killed export of this name left
    temps: List[Path] = []
    try:
        if kind == "torchscript":
            temps.append(temp_path(out))
            say(f"scripting the model and writing {out.name}")
            save_torchscript(config, params, temps[0], max_seq_len)
        elif kind == "pt2":
            temps.append(temp_path(out, ".pt2"))
            say("exporting the forward pass (torch.export)")
            program = export_forward(model, config, max_seq_len, device)
            say(f"writing {out.name}")
            write_streamed(temps[0], lambda f: torch.export.save(program, f))
        else:
            from export.aoti import package

            temps.append(temp_path(out, ".pt2"))
            package(config, params, max_seq_len, temps[0], say)
        say("verifying against eager gptfn (logits and greedy decoding)")
        report = verify(kind, temps)
        say(f"committing {', '.join(f.name for f in [*finals, report_final])}")
        return commit(list(zip(temps, finals)), report, report_final)
    finally:
        for tmp in temps:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # left under a temporary name: the next export of this name removes it
