"""Cheap checks that a downloaded weight file is what its name says.

A mirror can answer 200 with an HTML page, or send a truncated file with an honest
Content-Length; where the server states no hash, these checks are all that stands between
such a file and the cache. They read a header or parse a small file and never hash the
data, so they are also cheap enough to run on cached files before trusting them:

- ``config.json``, ``hparams.json``: JSON that ``GPTConfig.from_dict`` accepts;
- ``*.safetensors``: the header parses and its tensors end exactly where the file does
  (``read_header``);
- ``encoder.json``: a JSON object; ``vocab.bpe``: UTF-8 text whose first line starts with
  ``#version``; ``checkpoint``: TF's text ``CheckpointState``, with a
  ``model_checkpoint_path`` line;
- ``*.index`` (a TF checkpoint index): a TF table, LevelDB's SSTable format: uncompressed
  blocks, each followed by a 5-byte trailer (type 0, the block's masked CRC-32C), and a
  48-byte footer of two block handles (metaindex, index), padding and the magic number
  0xdb4775248b80fb57. The index block points at the data blocks; their entries map each
  tensor name to a ``BundleEntryProto`` (dtype 1, shape 2, shard_id 3, offset 4, size 5,
  crc32c 6), and the empty key to the ``BundleHeaderProto`` (num_shards 1);
- ``*.data-NNNNN-of-MMMMM``: not empty; with the index (``check_set``), the index's shard
  count is MMMMM and every tensor's ``offset + size`` fits in its shard's data file;
- ``*.meta``: a well-formed protobuf message (a ``MetaGraphDef``) on the wire.

TensorFlow is not needed: the table and the protobuf wire format are read here, by hand.
Every failure is a ``BadFile`` whose message is a phrase to follow the file's name
("is not JSON (starts with '<!DOCTYPE html>')"); the first characters are quoted where they
are text (a page served in the file's place).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple, Union

PathLike = Union[str, os.PathLike]

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two BlockHandles of at most 20 bytes each, padded, then the magic
TRAILER_SIZE = 5  # after each block: compression type (1 byte) + masked crc32c (4 bytes)
_DATA_NAME = re.compile(r"^(.*)\.data-(\d{5})-of-(\d{5})$")


class BadFile(ValueError):
    """A file that is not what its name says; ``names`` are the files at fault."""

    def __init__(self, problem: str, names: Sequence[str] = ()):
        super().__init__(problem)
        self.names = tuple(names)


def check_file(path: PathLike, name: str = "") -> None:
    """Check the content of ``path`` as the file ``name`` (default: its own name)."""
    path = Path(path)
    name = name or path.name
    if path.stat().st_size == 0:
        raise BadFile("is empty")
    if name in ("config.json", "hparams.json"):
        _check_config(path)
    elif name.endswith(".safetensors"):
        _check_safetensors(path)
    elif name == "encoder.json":
        if not isinstance(_json(path), dict):
            raise BadFile("is not a JSON object")
    elif name == "vocab.bpe":
        if not _text(path, "a BPE merges file").startswith("#version"):
            raise BadFile(f"is not a BPE merges file{_starts(path)}")
    elif name == "checkpoint":
        text = _text(path, "a TF checkpoint state")
        if not re.search(r"^model_checkpoint_path:", text, re.M):
            raise BadFile(f"is not a TF checkpoint state{_starts(path)}")
    elif name.endswith(".index"):
        read_tf_index(path)
    elif name.endswith(".meta"):
        try:
            for _ in _fields(path.read_bytes()):
                pass
        except BadFile as e:
            raise BadFile(f"is not a TF MetaGraph protobuf: {e}{_starts(path)}") from None


def check_set(directory: PathLike, names: Sequence[str]) -> None:
    """What one file cannot say alone: a TF index and its data files agree."""
    directory = Path(directory)
    shards: Dict[str, Dict[int, Tuple[int, str]]] = {}  # prefix -> shard -> (count, name)
    for name in names:
        m = _DATA_NAME.match(name)
        if m:
            shards.setdefault(m.group(1), {})[int(m.group(2))] = (int(m.group(3)), name)
    for index in (n for n in names if n.endswith(".index")):
        data = shards.get(index[: -len(".index")], {})
        num_shards, entries = read_tf_index(directory / index)
        counts = {count for count, _ in data.values()}
        if sorted(data) != list(range(num_shards)) or counts - {num_shards}:
            have = ", ".join(n for _, n in data.values()) or "none"
            raise BadFile(f"{index} states {num_shards} data shard(s), but the data files are "
                          f"{have}", names=[index, *(n for _, n in data.values())])
        sizes = {i: (directory / n).stat().st_size for i, (_, n) in data.items()}
        for tensor, shard, offset, size in entries:
            if offset + size > sizes[shard]:
                name = data[shard][1]
                raise BadFile(
                    f"{index} and {name} disagree: tensor {tensor!r} needs bytes {offset}-"
                    f"{offset + size} of the data file, which has {sizes[shard]} bytes"
                    f"{_starts(directory / name)}", names=[index, name])


# ----------------------------------------------------------------- text, JSON, safetensors

def _starts(path: Path, chars: int = 15) -> str:
    """`` (starts with '<!DOCTYPE html>')``: the file's first characters, where they are text
    (a page served in the file's place), else nothing."""
    with open(path, "rb") as fh:
        head = fh.read(4 * chars).decode("utf-8", errors="replace")[:chars]
    if not head or not all(c.isprintable() or c in "\t\r\n" for c in head):
        return ""
    return f" (starts with {head!r})"


def _text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadFile(f"is not {what}: not UTF-8 text") from None


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BadFile(f"is not JSON{_starts(path)}") from None


def _check_config(path: Path) -> None:
    from gptfn.config import GPTConfig

    data = _json(path)
    try:
        GPTConfig.from_dict(data)
    except ValueError as e:
        raise BadFile(f"is not a GPT-2 config ({e})") from None


def _check_safetensors(path: Path) -> None:
    from gptfn.weights.safetensors_io import SafetensorsError, read_header

    try:
        read_header(path)
    except SafetensorsError as e:
        text = str(e).removeprefix(f"{path}: ")
        raise BadFile(f"is not a valid safetensors file: {text}{_starts(path)}") from None


# ------------------------------------------------------------- TF table and protobuf wire

def read_tf_index(path: PathLike) -> Tuple[int, List[Tuple[str, int, int, int]]]:
    """(num_shards, [(tensor name, shard_id, offset, size)]) of a TF checkpoint index."""
    path = Path(path)
    data = path.read_bytes()
    try:
        if len(data) < FOOTER_SIZE:
            raise BadFile(f"{len(data)} bytes, shorter than a table footer")
        footer = data[-FOOTER_SIZE:]
        if struct.unpack_from("<Q", footer, FOOTER_SIZE - 8)[0] != TABLE_MAGIC:
            raise BadFile("no table magic number at its end")
        _, i = _varint(footer, _varint(footer, 0)[1])  # the metaindex handle: unused
        index_offset, i = _varint(footer, i)
        index_size, _ = _varint(footer, i)
        num_shards, entries, header_seen = 1, [], False
        for _, handle in _block(data, index_offset, index_size):
            offset, j = _varint(handle, 0)
            size, _ = _varint(handle, j)
            for key, value in _block(data, offset, size):
                fields = {f: v for f, _, v in _fields(value)}
                if key == b"":
                    header_seen = True
                    num_shards = fields.get(1, 1)
                    continue
                name = key.decode("utf-8", errors="replace")
                shard, start, nbytes = fields.get(3, 0), fields.get(4, 0), fields.get(5, 0)
                if not all(isinstance(v, int) for v in (shard, start, nbytes, num_shards)):
                    raise BadFile(f"entry {name!r} is not a BundleEntryProto")
                if not 0 <= shard < num_shards:
                    raise BadFile(f"entry {name!r} is in shard {shard} of {num_shards}")
                entries.append((name, shard, start, nbytes))
        if not header_seen:
            raise BadFile("no bundle header (the empty key)")
    except BadFile as e:
        raise BadFile(f"is not a TF checkpoint index: {e}{_starts(path)}") from None
    return num_shards, entries


def _block(data: bytes, offset: int, size: int) -> Iterator[Tuple[bytes, bytes]]:
    """The (key, value) entries of the table block at ``offset``."""
    end = offset + size
    if end + TRAILER_SIZE > len(data) - FOOTER_SIZE or size < 4:
        raise BadFile(f"block {offset}+{size} lies outside the file's {len(data)} bytes")
    if data[end] != 0:
        raise BadFile(f"block {offset} has compression type {data[end]} (TF writes none)")
    stored = struct.unpack_from("<I", data, end + 1)[0]
    if _masked_crc32c(data[offset:end + 1]) != stored:
        raise BadFile(f"block {offset} fails its checksum")
    block = data[offset:end]
    restarts = struct.unpack_from("<I", block, size - 4)[0]
    stop = size - 4 - 4 * restarts
    if stop < 0:
        raise BadFile(f"block {offset} states {restarts} restart points in {size} bytes")
    i, key = 0, b""
    while i < stop:
        shared, i = _varint(block, i)
        unshared, i = _varint(block, i)
        length, i = _varint(block, i)
        if shared > len(key) or i + unshared + length > stop:
            raise BadFile(f"block {offset} has an entry that runs past its end")
        key = key[:shared] + block[i:i + unshared]
        i += unshared
        yield key, block[i:i + length]
        i += length


def _crc32c_table() -> List[int]:
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1  # Castagnoli, reflected
        table.append(n)
    return table


_CRC32C = _crc32c_table()


def _masked_crc32c(buf: bytes) -> int:
    """CRC-32C of ``buf``, masked as LevelDB / TF store it in a block trailer."""
    crc = 0xFFFFFFFF
    for byte in buf:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf: bytes, i: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise BadFile("a varint runs past its end")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[Tuple[int, int, Union[int, bytes]]]:
    """(field number, wire type, value) of each field of a protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise BadFile(f"field number 0 at byte {i}")
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 2, 5):
            n = 8 if wire == 1 else 4 if wire == 5 else None
            if n is None:
                n, i = _varint(buf, i)
            if i + n > len(buf):
                raise BadFile(f"field {field} runs past the end ({i + n} > {len(buf)} bytes)")
            value, i = buf[i:i + n], i + n
        else:
            raise BadFile(f"wire type {wire} at byte {i}")
        yield field, wire, value
