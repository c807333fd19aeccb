"""``gptfn prepare``: text files -> one flat uint16 token file + a small JSON, streaming.

Output directory layout:

- ``tokens.bin``: every token id as little-endian uint16, documents in input order, each
  followed by ``<|endoftext|>`` (a file is a document);
- ``meta.json``: token count, tokenizer, sha256 of ``tokens.bin``, the inputs, and the
  train/validation split as token ranges (validation = the last ``val_fraction`` of tokens).

Memory does not grow with the corpus: files are read in blocks, decoded incrementally,
cut at places where GPT-2's pre-tokenizer always splits (so the tokens equal those of
encoding the whole file at once) and written as they come. Imports no torch.

The two files are one unit. ``tokens.bin`` is written under a temporary name; when it is
whole, the new description is written as ``.meta.json.pending``, ``tokens.bin`` is renamed
into place, and the pending description is renamed to ``meta.json``. A run killed or failed
at any point leaves the old pair, or the new pair, or tokens.bin between two descriptions
that both name the token count and sha256 of the data they describe: ``read_meta`` takes the
one that matches ``tokens.bin`` (and the next ``prepare`` settles it).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from gptfn.checks import is_int
from gptfn.fileio import atomic_write_text, fsync_dir, remove_stale_temps, sha256_file, temp_path
from gptfn.progress import byte_bar
from gptfn.tokenizer import BPETokenizer

TOKENS_NAME = "tokens.bin"
META_NAME = "meta.json"
PENDING_NAME = ".meta.json.pending"
FORMAT = "gptfn-tokens"
TOKEN_DTYPE = np.dtype("<u2")
BLOCK_BYTES = 1 << 18
BATCH_BLOCKS = 8
ENCODE_THREADS = min(8, os.cpu_count() or 1)

# Places where GPT-2's pre-tokenizer always splits, whatever comes before or after:
# - after a non-space x followed by " y" (y non-space): no piece runs from x into
#   whitespace, and a single space before y is the start of y's piece;
# - after "x\n" followed by y (x, y non-space): a newline between two non-spaces is a
#   piece of its own, both inside the text and at the end of a cut-off block.
# Text cut there encodes to exactly the tokens of the uncut text. (Python's \s covers
# every character that the pre-tokenizer's \s does, so these cuts are conservative.)
_SAFE_CUT = re.compile(r"\S(?= \S)|\S\n(?=\S)")


def safe_cut(text: str, window: int = 4096) -> int:
    """The last index in ``text`` where it may be cut without changing its tokens (0: none)."""
    start = max(0, len(text) - window)
    last = None
    for last in _SAFE_CUT.finditer(text, start):
        pass
    if last is None:
        return 0 if start == 0 else safe_cut(text[:start], window * 4)
    return last.end()


def find_inputs(inputs: Sequence[Union[str, Path]], glob: str = "*.txt") -> List[Path]:
    """Files named, plus the files under each directory matching ``glob`` (recursively),
    sorted within each directory; an error names an input that is missing or empty."""
    if not glob or Path(glob).is_absolute() or ".." in Path(glob).parts:
        raise ValueError(f"the glob must match names inside the directories given, got {glob!r}")
    files: List[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob(glob) if p.is_file())
            if not found:
                raise ValueError(f"directory {path} holds no file matching {glob!r}")
            files.extend(found)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not files:
        raise ValueError("no input files given")
    return files


def iter_text_blocks(path: Path, errors: str = "strict", block_bytes: int = BLOCK_BYTES
                     ) -> Iterator[Tuple[str, int]]:
    """Yield (text, bytes consumed) blocks of a UTF-8 file, each cut at a safe place."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    pending = ""
    offset = 0
    with open(path, "rb") as fh:
        while True:
            raw = fh.read(block_bytes)
            final = not raw
            held = len(decoder.getstate()[0])  # bytes of an unfinished character, from before
            try:
                pending += decoder.decode(raw, final=final)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path} is not valid UTF-8 (byte {offset - held + e.start}: {e.reason}); "
                    "pass errors='replace' (--errors replace) to substitute U+FFFD"
                ) from None
            offset += len(raw)
            if final:
                if pending:
                    yield pending, len(raw)
                return
            cut = safe_cut(pending) if len(pending) > block_bytes // 4 else 0
            if cut:
                yield pending[:cut], len(raw)
                pending = pending[cut:]
            elif len(raw):
                yield "", len(raw)  # nothing safe to cut yet: report progress only


@dataclass
class PrepareResult:
    out_dir: Path
    token_count: int
    seconds: float
    meta: dict


def prepare(
    inputs: Sequence[Union[str, Path]],
    out_dir: Union[str, Path],
    tokenizer: Union[str, BPETokenizer] = "gpt2",
    val_fraction: float = 0.05,
    glob: str = "*.txt",
    errors: str = "strict",
    progress: bool = True,
    on_block: Optional[Callable[[int], None]] = None,
) -> PrepareResult:
    """Tokenize ``inputs`` (files, or directories searched recursively with ``glob``) into
    ``out_dir/tokens.bin`` + ``out_dir/meta.json``. See the module docstring."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if errors not in ("strict", "replace", "ignore"):
        raise ValueError(f"errors must be 'strict', 'replace' or 'ignore', got {errors!r}")
    tok = tokenizer if isinstance(tokenizer, BPETokenizer) else BPETokenizer(tokenizer)
    if tok.n_vocab > 2**16:
        raise ValueError(f"tokenizer {tok.name} has {tok.n_vocab} ids: too many for uint16")
    files = find_inputs(inputs, glob)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _settle(out)
    remove_stale_temps(out / TOKENS_NAME)
    total_bytes = sum(f.stat().st_size for f in files)
    started = time.perf_counter()
    sha = hashlib.sha256()
    count = 0
    records: List[Dict[str, object]] = []
    bar = byte_bar(total_bytes, progress, "prepare")

    def encode(text: str) -> np.ndarray:
        # tiktoken's buffer encoder: ids straight into an array, no Python ints (less
        # memory churn than encode_ordinary_batch); it releases the GIL, so threads help.
        return tok.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    pool = ThreadPoolExecutor(max_workers=ENCODE_THREADS)
    tmp_tokens = temp_path(out / TOKENS_NAME)
    try:
        with open(tmp_tokens, "wb") as fh:

            def write(ids: Union[Sequence[int], np.ndarray]) -> None:
                nonlocal count
                arr = np.asarray(ids).astype(TOKEN_DTYPE)
                fh.write(arr.tobytes())
                sha.update(arr.tobytes())
                count += arr.size

            for path in files:
                first = count
                for texts, nbytes in _batched(iter_text_blocks(path, errors), BATCH_BLOCKS):
                    for ids in pool.map(encode, texts):
                        write(ids)
                    bar.update(nbytes)
                    if on_block is not None:
                        on_block(count)
                write([tok.eot_token])
                records.append({"path": str(path), "bytes": path.stat().st_size,
                                "tokens": count - first})
            fh.flush()
            os.fsync(fh.fileno())
        meta = _meta(tok, count, sha.hexdigest(), val_fraction, records)
        atomic_write_text(out / PENDING_NAME, json.dumps(meta, indent=2) + "\n")
        os.replace(tmp_tokens, out / TOKENS_NAME)
        os.replace(out / PENDING_NAME, out / META_NAME)
        fsync_dir(out)
    finally:
        tmp_tokens.unlink(missing_ok=True)
        pool.shutdown()
        bar.close()
    return PrepareResult(out, count, time.perf_counter() - started, meta)


def _batched(blocks: Iterator[Tuple[str, int]], n: int) -> Iterator[Tuple[List[str], int]]:
    texts: List[str] = []
    nbytes = 0
    for text, size in blocks:
        if text:
            texts.append(text)
        nbytes += size
        if len(texts) == n:
            yield texts, nbytes
            texts, nbytes = [], 0
    if texts or nbytes:
        yield texts, nbytes


def _meta(tok: BPETokenizer, count: int, digest: str, val_fraction: float,
          records: List[Dict[str, object]]) -> dict:
    val_start = count - int(count * val_fraction)
    return {
        "format": FORMAT,
        "version": 1,
        "dtype": "uint16",
        "tokenizer": tok.name,
        "n_vocab": tok.n_vocab,
        "eot_token": tok.eot_token,
        "token_count": count,
        "sha256": digest,
        "val_fraction": val_fraction,
        "splits": {"train": [0, val_start], "val": [val_start, count]},
        "documents": "each input file is a document, followed by <|endoftext|>",
        "inputs": records,
    }


def read_meta(out_dir: Union[str, Path]) -> dict:
    """``meta.json`` of a prepared directory, checked against its token file's size (or the
    pending description, where a cut-off ``prepare`` left ``tokens.bin`` already new)."""
    out = Path(out_dir).expanduser()
    meta_path = out / META_NAME
    if (out / PENDING_NAME).is_file():
        return _load_meta(_matching_description(out), out)
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{out} is not a prepared corpus (no {META_NAME}); run: gptfn prepare INPUT --out {out}"
        )
    meta = _load_meta(meta_path, out)
    size = _tokens_size(out)
    if size != meta["token_count"] * TOKEN_DTYPE.itemsize:
        raise ValueError(
            f"{out / TOKENS_NAME} holds {size} bytes but {META_NAME} says "
            f"{meta['token_count']} tokens ({meta['token_count'] * TOKEN_DTYPE.itemsize} bytes)"
        )
    return meta


def _tokens_size(out: Path) -> Optional[int]:
    return (out / TOKENS_NAME).stat().st_size if (out / TOKENS_NAME).is_file() else None


def _load_meta(meta_path: Path, out: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not a gptfn token-file description")
    count = meta.get("token_count")
    splits = meta.get("splits")
    if not is_int(count) or count < 0:
        raise ValueError(f"{meta_path}: token_count is {count!r}, not a count")
    if not isinstance(splits, dict) or not all(
        isinstance(v, list) and len(v) == 2 and all(is_int(i) for i in v)
        and 0 <= v[0] <= v[1] <= count
        for v in splits.values()
    ):
        raise ValueError(f"{meta_path}: splits {splits!r} are not token ranges within {count} "
                         "tokens")
    return meta


def _matching_description(out: Path) -> Path:
    """Of meta.json and the pending description, the one that describes tokens.bin."""
    size = _tokens_size(out)
    fits = []
    for path in (out / PENDING_NAME, out / META_NAME):
        if path.is_file():
            count = _load_meta(path, out)["token_count"]
            if size == count * TOKEN_DTYPE.itemsize:
                fits.append(path)
    if len(fits) == 2:  # both have its length: only the digest can tell
        digest = sha256_file(out / TOKENS_NAME)
        fits = [p for p in fits if _load_meta(p, out).get("sha256") == digest] or fits[:1]
    if not fits:
        raise ValueError(f"{out / TOKENS_NAME} ({size} bytes) matches neither {META_NAME} nor "
                         f"{PENDING_NAME}: prepare the corpus again")
    return fits[0]


def _settle(out: Path) -> None:
    """Finish (or drop) what a cut-off prepare left: meta.json becomes the description that
    matches tokens.bin."""
    pending = out / PENDING_NAME
    if not pending.is_file():
        return
    try:
        keep = _matching_description(out)
    except ValueError:
        keep = None
    if keep == pending:
        os.replace(pending, out / META_NAME)
    else:
        pending.unlink()


def verify(out_dir: Union[str, Path]) -> None:
    """Recompute the sha256 of ``tokens.bin`` and compare it with ``meta.json``."""
    meta = read_meta(out_dir)
    if sha256_file(Path(out_dir).expanduser() / TOKENS_NAME) != meta["sha256"]:
        raise ValueError(f"{Path(out_dir) / TOKENS_NAME}: sha256 does not match {META_NAME}")


def describe(result: PrepareResult) -> str:
    meta = result.meta
    train = meta["splits"]["train"]
    val = meta["splits"]["val"]
    return (
        f"wrote {result.token_count:,} tokens ({meta['tokenizer']}) from "
        f"{len(meta['inputs'])} file(s) to {result.out_dir / TOKENS_NAME} in "
        f"{result.seconds:.1f} s; train {train[1] - train[0]:,} tokens, "
        f"val {val[1] - val[0]:,}; sha256 {meta['sha256'][:16]}..."
    )
