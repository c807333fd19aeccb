"""Benchmark text that every machine has offline: the Python standard library's sources.

Real, varied text (code, comments, docstrings, some non-ASCII), read in a fixed order so
every run tokenizes the same bytes.
"""

from __future__ import annotations

import sysconfig
from itertools import cycle
from pathlib import Path
from typing import List


def stdlib_texts(target_bytes: int) -> List[str]:
    """Whole .py files of the standard library, sorted by path, cycled until the texts
    hold at least ``target_bytes`` bytes of UTF-8 (the last file is cut)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise RuntimeError(f"no .py files under {root}")
    texts: List[str] = []
    total = 0
    while total < target_bytes:
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            size = len(text.encode("utf-8"))
            if total + size > target_bytes:
                text = text[: target_bytes - total]
                size = len(text.encode("utf-8"))
            texts.append(text)
            total += size
            if total >= target_bytes:
                break
    return texts


def write_corpus(out_dir: Path, target_bytes: int, file_bytes: int = 16 << 20) -> int:
    """Write about ``target_bytes`` of stdlib text into ``out_dir`` as files of about
    ``file_bytes`` each; returns the bytes written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = cycle(stdlib_texts(min(target_bytes, 32 << 20)))
    written, index = 0, 0
    while written < target_bytes:
        with open(out_dir / f"part{index:04d}.txt", "w", encoding="utf-8") as fh:
            while written < target_bytes and fh.tell() < file_bytes:
                text = next(texts)
                fh.write(text)
                written += len(text.encode("utf-8"))
        index += 1
    return written
