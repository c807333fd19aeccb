"""Reading and writing ``.safetensors`` files.

Reading is ours: the header is checked field by field (so a truncated file or a header
that lies about sizes gets an error that says which tensor and which bytes), and the data
is memory-mapped, not read: ``torch.UntypedStorage.from_file(shared=False)`` maps the file
copy-on-write and every tensor is a view into that mapping.

Writing is ours too (the format is a header and the bytes): tensors stream to a temporary
file in the target directory, which is renamed over the final name only when complete.
The reference library is used by the tests, as an independent reader.

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data; offsets are relative to the start of the data.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from gptfn.checks import is_int
from gptfn.fileio import atomic_path

PathLike = Union[str, os.PathLike]

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file."""


def read_header(path: PathLike) -> Tuple[int, Dict[str, dict], Dict[str, str]]:
    """Parse and check the header. Returns (data start offset, tensor entries, metadata)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: not a safetensors file ({size} bytes, too short)")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{path}: not a safetensors file or truncated (header length {n} "
                f"but the file has {size} bytes)"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SafetensorsError(f"{path}: not a safetensors file (header is not JSON: "
                               f"{e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings, got "
                               f"{metadata!r:.80}")
    data_start = 8 + n
    data_size = size - data_start
    spans = []
    for name, entry in header.items():
        _check_entry(path, name, entry, data_size)
        spans.append((entry["data_offsets"][0], entry["data_offsets"][1], name))
    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            what = "overlaps another tensor" if begin < end else f"leaves a gap at byte {end}"
            raise SafetensorsError(f"{path}: tensor {name!r} {what}")
        end = stop
    if end != data_size:
        raise SafetensorsError(
            f"{path}: header describes {end} bytes of tensor data but the file holds "
            f"{data_size} (truncated or padded)"
        )
    return data_start, header, metadata


def _check_entry(path: Path, name: str, entry: object, data_size: int) -> None:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise SafetensorsError(f"{path}: header entry {name!r} lacks dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        is_int(d) and d >= 0 for d in shape
    ):
        raise SafetensorsError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise SafetensorsError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise SafetensorsError(
            f"{path}: tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes} bytes "
            f"but its data_offsets span {offsets[1] - offsets[0]}"
        )
    if offsets[1] > data_size:
        raise SafetensorsError(
            f"{path}: tensor {name!r} ends at byte {offsets[1]} of the data but the file "
            f"holds only {data_size} (truncated)"
        )


def load_safetensors(path: PathLike) -> Dict[str, Tensor]:
    """All tensors of a safetensors file, as CPU views into a copy-on-write memory map.

    Writing to a returned tensor changes the process's private copy, never the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such safetensors file: {path}")
    data_start, header, _ = read_header(path)
    size = path.stat().st_size
    if size == 0:
        return {}
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)  # (file bytes,)
    tensors: Dict[str, Tensor] = {}
    for name, entry in header.items():
        dtype = DTYPES[entry["dtype"]]
        begin = data_start + entry["data_offsets"][0]
        end = data_start + entry["data_offsets"][1]
        chunk = raw[begin:end]
        if begin % dtype.itemsize:
            chunk = chunk.clone()  # unaligned data cannot be viewed as this dtype: copy it
        tensors[name] = chunk.view(dtype).reshape(entry["shape"])
    return tensors


def write_safetensors(
    tensors: Mapping[str, Tensor], path: PathLike, metadata: Optional[Dict[str, str]] = None
) -> None:
    """Write ``tensors`` to ``path`` in place (callers make it atomic), streaming one tensor
    at a time. Tensors are laid out by decreasing item size, then name, as the reference
    writer does, so every tensor's data is aligned to its item size; the header is padded
    with spaces to a multiple of 8 bytes."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    items = []
    for key, t in tensors.items():
        if t.dtype not in names:
            raise ValueError(f"tensor {key!r}: dtype {t.dtype} cannot be stored in safetensors")
        items.append((key, t.detach()))
    items.sort(key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, t in items:
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for _, t in items:
            data = t.contiguous().cpu().reshape(-1).view(torch.uint8)  # (nbytes,)
            fh.write(memoryview(data.numpy()))


def save_safetensors(
    tensors: Mapping[str, Tensor], path: PathLike, metadata: Optional[Dict[str, str]] = None
) -> Path:
    """Write ``tensors`` to ``path`` atomically (temporary file in the same directory, renamed)."""
    with atomic_path(path) as tmp:
        write_safetensors(tensors, tmp, metadata)
    return Path(path)
