"""Atomic file writes: write to a temporary file beside the target, then rename it over.

A crash or an exception mid-write leaves the previous file (or no file) under the final
name, never a half-written one. Temporary names are ``.NAME.XXXXXXXX.tmp`` (an artifact may
add its own suffix), so a later save of the same file can recognise (and remove) what a
killed one left, and nothing else.

Files get the mode the umask gives (``0o666 & ~umask``), as ``open()`` would give them, not
``mkstemp``'s private 0600: a saved model can be shared like any other file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple, Union

PathLike = Union[str, os.PathLike]


def umask_mode(base: int = 0o666) -> int:
    """``base`` less the process umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


@contextlib.contextmanager
def errors_naming(path: PathLike) -> Iterator[None]:
    """An OSError raised inside (a full disk, a missing directory) is raised again naming
    ``path``: the one-line error then says which file failed."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def fsync_file(path: PathLike) -> None:
    """Flush a written file to the disk; an error names the file."""
    with errors_naming(path), open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(directory: PathLike) -> None:
    """Make the unlinks and renames in ``directory`` durable (skipped where a file system
    cannot open or fsync a directory); any other error names the directory."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise OSError(e.errno, e.strerror, str(directory)) from None
    finally:
        os.close(fd)


def temp_path(path: PathLike, suffix: str = ".tmp") -> Path:
    """A new empty file beside ``path`` with the umask's mode, named ``.NAME.XXXX<suffix>``."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory does not exist: {path.parent}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, umask_mode())
    finally:
        os.close(fd)
    return Path(tmp_name)


def _temp_name(path: Path) -> "re.Pattern[str]":
    # temp_path's names: mkstemp's 8 characters, .tmp, at most one suffix of the file's own
    return re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp(\.[A-Za-z0-9]+)?")


def remove_stale_temps(path: PathLike) -> List[Path]:
    """Delete the temporary files that killed writes of ``path`` left beside it: regular
    files (never links) in its directory named as ``temp_path`` names them, except those a
    live writer holds locked (``hold_temp``). Returns them."""
    path = Path(path)
    pattern = _temp_name(path)
    removed = []
    with os.scandir(path.parent) as entries:
        for entry in entries:
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                try:
                    if _held(entry.path):
                        continue  # another process is writing it now
                    os.unlink(entry.path)
                except OSError:
                    continue  # litter, not harm: the write goes on
                removed.append(Path(entry.path))
    return removed


def _held(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_temp(path: PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the temporary file ``path`` while it is written, so that a
    concurrent write of the same target does not take it for a killed one's and remove it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; on success fsync it and rename it to
    ``path``; on failure delete it."""
    path = Path(path)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_together(files: Sequence[Tuple[PathLike, Callable[[Path], None]]]) -> List[Path]:
    """Write several files of one directory as a unit, for a reader that can tell a torn
    pair (see ``gptfn.weights.hub`` and ``gptfn.prepare``).

    Each ``(path, write)`` gets a temporary file beside ``path`` that ``write(tmp)`` fills;
    only when every one is written and fsynced are they renamed over their final names, in
    the order given. So an error or a kill while writing (a full disk, a kill -9) leaves
    every final name as it was, and only a failure between two renames leaves the first
    files new and the rest old: then the rest stay, complete, under their temporary names,
    which tells a reader what happened. Temporaries are removed by the next write.
    """
    temps: List[Tuple[Path, Path]] = []
    renamed = 0
    try:
        for path, write in files:
            path = Path(path)
            remove_stale_temps(path)
            tmp = temp_path(path)
            temps.append((tmp, path))
            write(tmp)
            fsync_file(tmp)
        for tmp, path in temps:
            os.replace(tmp, path)
            renamed += 1
    except BaseException:
        if renamed == 0:
            for tmp, _ in temps:
                tmp.unlink(missing_ok=True)
        raise
    fsync_dir(temps[0][1].parent)
    return [path for _, path in temps]


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def sha256_file(path: PathLike) -> str:
    """The hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
