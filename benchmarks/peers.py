"""The engines users pick instead of gptfn, as peers in the decode and prefill workloads.

- ``llama.cpp-f32``, ``llama.cpp-f16``, ``llama.cpp-q8_0``, ``llama.cpp-q4_0``: llama.cpp
  (through llama-cpp-python) on gptfn's own GGUF export (``export.gguf_file``; q4_0: every
  matrix in Q4_0, the tied head included) of the benchmark's model, with llama.cpp's
  defaults (its float16 KV cache; logits of the last position only);
- ``onnxruntime-fp32``, ``onnxruntime-int8``: ONNX Runtime on gptfn's ONNX export
  (``export.onnx_model``; int8: onnxruntime's dynamic quantization, ``export.interop``),
  driven as optimum drives it (past in, present out).

Each engine runs in a process of its own (``export.engines``) with the same thread count as
gptfn, is warmed up before the rounds, and runs in the same interleaved rounds as gptfn's
variants. The files are written once per run (``PeerFiles``) and shared by the workloads; a
peer whose engine is not installed is left out, and the table says which and why.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor

PEERS: Dict[str, Tuple[str, str]] = {
    "llama.cpp-f32": ("llama.cpp", "f32"),
    "llama.cpp-f16": ("llama.cpp", "f16"),
    "llama.cpp-q8_0": ("llama.cpp", "q8_0"),
    "llama.cpp-q4_0": ("llama.cpp", "q4_0"),
    "onnxruntime-fp32": ("onnxruntime", "fp32"),
    "onnxruntime-int8": ("onnxruntime", "int8"),
}
# gptfn's precisions in the decode workload, each held against llama.cpp's nearest
PRECISIONS = ("fp32", "bf16", "int8", "int4")
FORMATS = PRECISIONS[1:]  # the weight formats, measured beside fp32
# bytes one weight takes, and one KV-cache value, in each peer (for MBU): q8_0 stores 32
# int8 values and a float16 scale per block, q4_0 (and gptfn's int4) 32 4-bit values in 16
# bytes and a float16 scale; llama.cpp keeps its KV cache in float16
WEIGHT_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "fp32": 4.0,
                "int8": 1.0, "int4": 18 / 32}
CACHE_BYTES = {"llama.cpp": 2, "onnxruntime": 4}


def parse_peers(text: Optional[str]) -> List[str]:
    """``--peers``: ``all`` (the default), ``none``, or a comma-separated list of names
    (``llama.cpp`` and ``onnxruntime`` stand for all of that engine's)."""
    items = [part.strip() for part in (text or "all").split(",")]
    if "" in items:
        raise ValueError(f"an empty name in {text!r}; use all, none, or names")
    if "all" in items or "none" in items:
        if len(items) > 1:
            raise ValueError(f"all and none stand alone, got {text!r}")
        return list(PEERS) if items == ["all"] else []
    names: List[str] = []
    for item in items:
        matched = [n for n, (engine, _) in PEERS.items() if item in (n, engine)]
        if not matched:
            raise ValueError(f"unknown peer {item!r}; known: {', '.join(PEERS)}, llama.cpp, "
                             "onnxruntime, all, none")
        names += [n for n in matched if n not in names]
    return names


def missing(names: List[str]) -> Dict[str, str]:
    """Why each peer in ``names`` cannot run here (its packages are missing)."""
    import importlib.util

    from export.engines import available

    why = {}
    for name in names:
        engine, _ = PEERS[name]
        writers = ("gguf",) if engine == "llama.cpp" else ("onnx", "onnxscript")
        reason = available(engine)
        absent = [w for w in writers if importlib.util.find_spec(w) is None]
        if reason is None and absent:
            reason = f"{', '.join(absent)} not installed (the interop extra)"
        if reason:
            why[name] = reason
    return why


def fp32_params(model) -> Dict[str, Tensor]:
    """The model's parameters in float32, read only (to write the peers' files): the
    model's own tensors where they are float32 already, which a later cast of the model
    (``model.to``) leaves as they are; copies otherwise."""
    from gptfn.generation import model_parts

    _, params = model_parts(model)
    return {k: v.detach().float() for k, v in params.items()}


class PeerFiles:
    """The peers' model files for one model, written on first use into a temporary
    directory (removed by ``close``)."""

    def __init__(self, log=print):
        self._dir = tempfile.TemporaryDirectory(prefix="gptfn-peers-")
        self._key = None
        self._files: Dict[str, Path] = {}
        self.log = log

    def path(self, name: str, config, params) -> Path:
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key != self._key:  # another model: its own files, in place of the last one's
            for old in Path(self._dir.name).iterdir():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            self._files.clear()
            self._key = key
        if name not in self._files:
            self._files[name] = self._write(name, config, params)
        return self._files[name]

    def _write(self, name: str, config, params) -> Path:
        engine, precision = PEERS[name]
        root = Path(self._dir.name)
        self.log(f"  writing {name}'s model file (gptfn's {engine} export)")
        if engine == "llama.cpp":
            from export.gguf_file import write_gguf

            path = root / f"model-{precision}.gguf"
            write_gguf(path, config, params, precision)
            return path
        from export.interop import quantize_int8
        from export.onnx_model import INT8_FILE, MODEL_FILE, export_onnx, hf_config

        onnx_dir = root / "onnx"
        fp32 = onnx_dir / MODEL_FILE
        if not fp32.is_file():
            onnx_dir.mkdir(exist_ok=True)
            export_onnx(config, params, fp32)
            (onnx_dir / "config.json").write_text(hf_config(config), "utf-8")
        if precision == "fp32":
            return fp32
        quantize_int8(fp32, onnx_dir / INT8_FILE)
        return onnx_dir / INT8_FILE

    def close(self) -> None:
        self._dir.cleanup()

    def __enter__(self) -> "PeerFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def peer_engines(names: Sequence[str], files: Optional[PeerFiles], config, params,
                 threads: int, off: Optional[str] = None, log=print):
    """Yields ({name: Engine} for the peers in ``names`` that run here, {name: why not} for
    the rest), and stops the engines however the block ends. ``off``: why no peer runs in
    this workload (none is started)."""
    from export.engines import Engine, EngineError

    names = list(names)
    if off or not names:
        yield {}, {name: off for name in names}
        return
    log("starting the peers")
    skipped = missing(names)
    engines = {}
    try:
        for name in names:
            if name in skipped:
                continue
            engine, _ = PEERS[name]
            try:
                engines[name] = Engine(engine, files.path(name, config, params),
                                       threads=threads, n_ctx=config.context_length)
            except EngineError as e:
                skipped[name] = str(e)
        for name, why in skipped.items():
            log(f"  peer {name} left out: {why}")
        yield engines, skipped
    finally:
        for engine in engines.values():
            engine.close()
