"""Writing GGUF files and ONNX directories: build, check in the engine, then keep.

As with the torch artifacts (``export.build``), everything is written under temporary names,
checked (``export.verify_interop``), and committed with its report as one unit
(``export.commit``):

- ``gguf``: ``OUT.gguf`` and ``OUT.gguf.report.json``;
- ``onnx``: in directory ``OUT`` (created; or an earlier ONNX export of gptfn's, which is
  replaced): ``model.onnx`` (+ ``model.onnx.data`` past protobuf's 2 GB), ``config.json``
  (HF's GPT-2 config, which optimum reads), with ``--int8`` ``model_quantized.onnx``, and
  ``model.onnx.report.json``. The files are built in a staging directory inside ``OUT``
  (an ONNX file names its weights file relative to itself, so the pair is checked under its
  final names), then moved up.

A directory holding anything else (a model of the user's, say), or a report that does not
describe the files beside it, is refused, never written. One export writes into a directory
at a time (a lock, ``.gptfn-export.lock``); a second is refused. A GGUF export holds its
temporary file locked, so that another export of the same name, which removes the
temporaries killed exports left, leaves it alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List

from export.commit import (StaleReport, commit, read_report, remove_stale_temps, report_path,
                           temp_path)
from gptfn.fileio import hold_temp

ONNX_REPORT = "model.onnx.report.json"
_STAGING_PREFIX = ".gptfn-onnx-staging."


def build_gguf(model, out: Path, dtype: str, seed: int, threads: int,
               log: Callable[[str], None]) -> dict:
    from export.gguf_file import write_gguf
    from export.verify_interop import verify_gguf
    from gptfn.generation import model_parts

    config, params = model_parts(model)
    report_final = report_path(out)
    remove_stale_temps([out, report_final])  # not those a live export holds
    tmp = temp_path(out, ".gguf")
    try:
        with hold_temp(tmp):  # a second export of the same name leaves it alone
            log(f"writing {out.name} ({dtype}) with the gguf package")
            types = write_gguf(tmp, config, params, dtype, name=out.stem)
            log(f"loading {out.name} in llama.cpp and checking it against eager gptfn")
            report = {"kind": "gguf", "dtype": dtype, "size_bytes": tmp.stat().st_size,
                      "tensor_types": sorted(set(types.values())),
                      **verify_gguf(tmp, model, dtype, seed, threads)}
            log(f"committing {out.name}, {report_final.name}")
            return commit([(tmp, out)], report, report_final)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # left under a temporary name: the next export of this name removes it


def _ignored(name: str) -> bool:
    """Entries of an ONNX export directory that are no export's file: the lock, the staging
    directories a killed export left, and a user's dotfiles."""
    return name.startswith(".")


def check_onnx_dir(out: Path) -> List[str]:
    """Refuse an ``--out`` that is not a new or empty directory or an earlier gptfn ONNX
    export (its report checking out against the files beside it). Returns the files the
    earlier export's report names (none for a new directory)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    if not out.exists():
        if not out.parent.is_dir():
            raise FileNotFoundError(f"output directory's parent does not exist: {out.parent}")
        return []
    entries = sorted(p.name for p in out.iterdir() if not _ignored(p.name))
    if not entries:
        return []
    if ONNX_REPORT not in entries:
        raise FileExistsError(f"--out {out} is a directory that holds no gptfn ONNX export: give "
                              "a new or empty directory")
    try:
        report = read_report(out / ONNX_REPORT)
    except (StaleReport, OSError) as e:
        raise FileExistsError(f"--out {out}: its {ONNX_REPORT} is not a report of the files "
                              f"beside it ({e}): give a new or empty directory") from None
    named = [a["file"] for a in report["artifacts"]]
    others = [n for n in entries if n not in named and n != ONNX_REPORT]
    if report.get("kind") != "onnx" or others:
        raise FileExistsError(f"--out {out} holds files that are not its ONNX export's "
                              f"({', '.join(others[:3]) or ONNX_REPORT}): give a new or empty "
                              "directory")
    return named


def build_onnx(model, out: Path, int8: bool, seed: int, threads: int,
               log: Callable[[str], None]) -> dict:
    from export.onnx_model import INT8_FILE, MODEL_FILE, export_onnx, hf_config
    from export.verify_interop import verify_onnx
    from gptfn.generation import model_parts

    config, params = model_parts(model)
    created = not out.exists()
    check_onnx_dir(out)
    out.mkdir(exist_ok=True)
    try:
        with _exclusive(out / ".gptfn-export.lock"):
            earlier = check_onnx_dir(out)  # again, now that no other export is writing here
            for stale in out.glob(_STAGING_PREFIX + "*"):  # what a killed export left
                shutil.rmtree(stale, ignore_errors=True)
            stage = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out))
            try:
                log(f"exporting the decoder with torch.onnx (dynamo) into {out}/{MODEL_FILE}")
                export_onnx(config, params, stage / MODEL_FILE)
                (stage / "config.json").write_text(hf_config(config), encoding="utf-8")
                log(f"checking {MODEL_FILE} in ONNX Runtime against eager gptfn")
                checks = {MODEL_FILE: verify_onnx(stage / MODEL_FILE, model, "fp32", seed,
                                                  threads)}
                if int8:
                    log(f"quantizing to int8 with onnxruntime's quantize_dynamic into "
                        f"{INT8_FILE}")
                    quantize_int8(stage / MODEL_FILE, stage / INT8_FILE)
                    checks[INT8_FILE] = verify_onnx(stage / INT8_FILE, model, "int8", seed,
                                                    threads)
                files = sorted(p for p in stage.iterdir() if p.is_file())
                report = {"kind": "onnx", "checks": checks,
                          "size_bytes": sum(p.stat().st_size for p in files)}
                log(f"committing {', '.join(p.name for p in files)}, {ONNX_REPORT}")
                report = commit([(p, out / p.name) for p in files], report, out / ONNX_REPORT)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
            # the earlier export's files that this one did not write (its int8 model, say):
            # its report named them, the new one does not
            for name in set(earlier) - {p.name for p in files}:
                path = out / name
                if path.is_file() and not path.is_symlink():
                    path.unlink()
            return report
    except BaseException:
        if created:  # a new directory that holds nothing of ours: as if never made
            (out / ".gptfn-export.lock").unlink(missing_ok=True)
            try:
                out.rmdir()
            except OSError:
                pass
        raise


@contextlib.contextmanager
def _exclusive(lock: Path):
    """One export into a directory at a time: a second one is refused, not interleaved
    (it would remove the first's staging files as a killed export's)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"another export is writing into {lock.parent}") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # still held: an export that opened it is refused
    finally:
        os.close(fd)


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic quantization of every MatMul by a weight: int8 weights per
    output channel, activations quantized at run time.

    The tied head multiplies by ``Transpose(wte)``, which the quantizer cannot take as a
    weight (it would keep the 38.6M-value matrix in float and dequantize it every step):
    the head first gets its own transposed copy as an initializer, as optimum's exports
    have. The embedding table stays float32 (a lookup reads one row; nothing to gain).
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ImportError("--int8 needs onnxruntime (pip install onnxruntime)") from None
    prepared = dst.with_name(dst.stem + ".prepared.onnx")
    try:
        large = _untie_head(src, prepared)
        root = logging.getLogger()
        advice = _DropMessage("Please consider to run pre-processing before quantization")
        root.addFilter(advice)  # a note for image models; a decoder's MatMuls need no shape pass
        try:
            quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8,
                             per_channel=True, op_types_to_quantize=["MatMul"],
                             use_external_data_format=large)
        finally:
            root.removeFilter(advice)
    finally:
        for leftover in (prepared, prepared.with_name(prepared.name + ".data")):
            leftover.unlink(missing_ok=True)


def _untie_head(src: Path, dst: Path) -> bool:
    """Copy ``src`` to ``dst`` with each MatMul by a transposed initializer reading a
    transposed copy instead. Returns whether the copy needs external data (past 2 GB)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        t = producer.get(node.input[1]) if node.op_type == "MatMul" else None
        if t is None or t.op_type != "Transpose" or t.input[0] not in weights:
            continue
        w = numpy_helper.to_array(weights[t.input[0]])
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        copy = numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)),
                                       name=t.input[0] + "_transposed")
        graph.initializer.append(copy)
        node.input[1] = copy.name
    large = model.ByteSize() > 2_000_000_000 - (1 << 24)
    onnx.save(model, str(dst), save_as_external_data=large,
              location=dst.name + ".data" if large else None)
    return large


class _DropMessage(logging.Filter):
    """Drops log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)
