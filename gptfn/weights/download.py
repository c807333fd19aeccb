"""``gptfn.download``: GPT-2 weights into gptfn's cache, resumable, checked, offline-first.

Sources:

- ``hf`` (default): ``config.json`` and ``model.safetensors`` of the hub repositories
  ``openai-community/{gpt2,gpt2-medium,gpt2-large,gpt2-xl}``, fetched from
  ``{base}/{repo}/resolve/main/{file}``; base ``https://huggingface.co``, or ``HF_ENDPOINT``,
  or ``base_url``. Cached in ``CACHE/hf/{repo}/``.
- ``openai``: the seven files of OpenAI's release for a size (124M, 355M, 774M, 1558M) from
  ``{base}/models/{size}/{file}``; base OpenAI's public GPT-2 storage, or
  ``GPTFN_OPENAI_BASE_URL``, or ``base_url``. Cached in ``CACHE/openai/models/{size}/``.

``CACHE`` is ``cache_dir``, else ``$GPTFN_CACHE_DIR``, else ``$XDG_CACHE_HOME/gptfn``, else
``~/.cache/gptfn``. Nothing outside it is written, truncated or deleted: no symbolic link
below it is followed for writing (a link where a ``.part``, staged or lock file or the staging
directory belongs is removed, never its target; a directory between ``CACHE`` and the model's
directory, or the model's directory itself, that is a link is an error), and no link is ever
published as (or in) a model's directory.

A model's files are one unit. The model's directory (``CACHE/hf/openai-community/gpt2``, say)
exists only holding a complete set: the files are downloaded into a staging directory beside
it (``.gpt2.partial``), which is renamed to ``gpt2`` only when every file is there and
checked. A cut, a kill or a full disk leaves no model directory (or the invalid one that was
there, or part of it), and the staging directory, from which the next run goes on. A set
already in the model directory is re-checked cheaply (``gptfn.weights.filecheck``: headers
and small files parsed, nothing hashed) and then used with no network at all; a set that
fails (incomplete, or a file that is not what its name says, such as what an older gptfn
left) is downloaded again, with a warning, and replaces it whole. Concurrent downloads of one
model take turns (``fcntl.flock`` on ``.gpt2.lock`` beside it).

Each file streams into ``NAME.part`` in the staging directory (a tqdm bar per file) and is
renamed to ``NAME`` only when it is whole and checked: its size matches Content-Length;
where the server states one, its hash matches (the hub's sha256 ``X-Linked-Etag`` / ``ETag``
of large files; Azure's ``Content-MD5`` / ``x-ms-blob-content-md5``); and its content is what
its name says (``filecheck``: config JSON a GPT-2 config, a safetensors header that ends where
the file does, a TF index whose tensors fit in the data file ...). A bad file is deleted, and
the ``DownloadError`` names the file, its URL and what is wrong. An interrupted transfer
resumes from the ``.part`` file with a Range request (and restarts cleanly when the server
ignores Range). Connection errors, time-outs, cut transfers, 429 and 5xx are retried with
exponential backoff; other HTTP errors are not. Files get the umask's mode.

``GPTFN_OFFLINE`` (or, where that is unset or empty, ``HF_HUB_OFFLINE``) set to ``1``,
``true``, ``yes`` or ``on`` forbids the network; ``0``, ``false``, ``no``, ``off`` or empty
allows it; any other value is an error.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import stat
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from gptfn.config import PRESET_ALIASES, PRESETS, preset_name
from gptfn.fileio import fsync_dir
from gptfn.progress import byte_bar
from gptfn.weights.filecheck import BadFile, check_file, check_set

HF_BASE = "https://huggingface.co"
OPENAI_BASE = "https://openaipublic.blob.core.windows.net/gpt-2"
HF_FILES = ("config.json", "model.safetensors")
OPENAI_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
HF_REPOS = {name: f"openai-community/{name}" for name in PRESETS}
OPENAI_SIZES = {name: size for size, name in PRESET_ALIASES.items()}  # gpt2 -> 124M ...
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK = 1 << 16  # written as it comes: a cut transfer keeps all but the last chunk
OFFLINE_VARIABLES = ("GPTFN_OFFLINE", "HF_HUB_OFFLINE")  # the first one not empty decides
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


class DownloadError(OSError):
    """A download that failed for good (after retries, where retrying made sense)."""


class _Retry(Exception):
    """A transient failure: try again (resuming from the .part file)."""


def default_cache_dir() -> Path:
    """gptfn's cache directory: ``$GPTFN_CACHE_DIR``, else ``$XDG_CACHE_HOME/gptfn``, else
    ``~/.cache/gptfn``."""
    if os.environ.get("GPTFN_CACHE_DIR"):
        return Path(os.environ["GPTFN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gptfn"


def plan(
    name: str,
    source: str = "hf",
    base_url: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> Tuple[Path, List[Tuple[str, str]]]:
    """(target directory, [(file name, url)]) for a model and source."""
    key = preset_name(name)
    cache = _cache_root(cache_dir)
    if source == "hf":
        base = (base_url or os.environ.get("HF_ENDPOINT") or HF_BASE).rstrip("/")
        repo = HF_REPOS[key]
        return cache / "hf" / repo, [(f, f"{base}/{repo}/resolve/main/{f}") for f in HF_FILES]
    if source == "openai":
        base = (base_url or os.environ.get("GPTFN_OPENAI_BASE_URL") or OPENAI_BASE).rstrip("/")
        size = OPENAI_SIZES[key]
        return (cache / "openai" / "models" / size,
                [(f, f"{base}/models/{size}/{f}") for f in OPENAI_FILES])
    raise ValueError(f"unknown source {source!r}: use 'hf' or 'openai'")


def _cache_root(cache_dir) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def offline() -> Optional[str]:
    """``"VAR=value"`` of the variable that forbids downloads, or None (see the module
    docstring). A value that is neither true nor false is a ValueError naming it."""
    decided: Optional[bool] = None
    found = None
    for var in OFFLINE_VARIABLES:
        value = os.environ.get(var)
        if value is None:
            continue
        word = value.strip().lower()
        if word not in _TRUE and word not in _FALSE:
            raise ValueError(
                f"{var}={value!r} is not understood: set it to 1, true, yes or on to forbid "
                "downloads, or to 0, false, no, off or nothing to allow them"
            )
        if decided is None and word:
            decided = word in _TRUE
            found = f"{var}={value}" if decided else None
    return found


def is_cached(name: str, source: str = "hf", cache_dir=None) -> bool:
    """Whether the cache holds the model's complete file set, and it passes the cheap checks."""
    target, files = plan(name, source, None, cache_dir)
    return _set_problem(target, [f for f, _ in files]) is None


def download(
    name: str,
    source: str = "hf",
    base_url: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 30.0,
) -> Path:
    """Fetch a GPT-2 model's files into the cache (see the module docstring); returns the
    directory that holds them. A complete, valid set already cached is not fetched again."""
    target, files = plan(name, source, base_url, cache_dir)
    names = [f for f, _ in files]
    forbidden = offline()
    problem = _set_problem(target, names)
    if problem is None:
        return target
    if forbidden:
        raise DownloadError(f"{name} is not in the cache ({problem[1]}) and downloads are "
                            f"disabled ({forbidden})")
    if target.is_symlink():
        raise DownloadError(f"{target} is a symbolic link to an incomplete model ({problem[1]}):"
                            " gptfn does not download through it; remove it, or fill it yourself")
    import requests

    _make_parents(_cache_root(cache_dir), target.parent)
    staging = target.with_name(f".{target.name}.partial")
    with _lock(target.with_name(f".{target.name}.lock"), progress):
        problem = _set_problem(target, names)  # another process may have made it meanwhile
        if problem is None:
            return target
        if target.is_symlink():
            raise DownloadError(f"{target} is a symbolic link to an incomplete model "
                                f"({problem[1]}): gptfn does not download through it; remove "
                                "it, or fill it yourself")
        if target.exists():
            warnings.warn(f"{problem[1]}: downloading {name} again", stacklevel=2)
        _make_staging(staging)
        for f in names:  # a staged file that no longer passes is fetched again
            if (staging / f).is_file() and _file_problem(staging / f):
                (staging / f).unlink()
        with requests.Session() as session:
            session.headers["User-Agent"] = "gptfn"
            for f, url in files:
                if not (staging / f).is_file():
                    fetch(url, staging / f, session, retries=retries, backoff=backoff,
                          timeout=timeout, progress=progress)
        try:  # each file was checked alone as it came (or, staged before, above)
            check_set(staging, names)
        except BadFile as e:
            for f in e.names:
                (staging / f).unlink(missing_ok=True)
            urls = dict(files)
            raise DownloadError(f"{e} (from {', '.join(urls[f] for f in e.names)}); "
                                f"{'both were' if len(e.names) == 2 else 'it was'} deleted")
        _publish(staging, target)
    return target


def _file_problem(path: Path) -> Optional[str]:
    try:
        check_file(path)
    except BadFile as e:
        return str(e)
    return None


def _set_problem(directory: Path, names: Sequence[str]) -> Optional[Tuple[List[str], str]]:
    """None when ``directory`` holds every file of ``names`` and they pass the cheap checks;
    else (the files at fault, what is wrong, naming the directory)."""
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        return list(names), f"{directory} {what}"
    missing = [f for f in names if not (directory / f).is_file()]
    if missing:
        return missing, f"{directory} lacks {', '.join(missing)}"
    for f in names:
        problem = _file_problem(directory / f)
        if problem:
            return [f], f"{directory / f} {problem}"
    try:
        check_set(directory, names)
    except BadFile as e:
        return list(e.names), f"in {directory}: {e}"
    return None


def _is_link(path: Path) -> bool:
    return os.path.islink(path)


def _lstat(path: Path) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _make_parents(cache: Path, parent: Path) -> None:
    """Make ``parent`` (a directory below ``cache``) and the directories between, refusing to
    go through a symbolic link below ``cache`` (``cache`` itself may be one)."""
    cache.mkdir(parents=True, exist_ok=True)
    here = cache
    for part in parent.relative_to(cache).parts:
        here = here / part
        st = _lstat(here)
        if st is None:
            with contextlib.suppress(FileExistsError):
                os.mkdir(here)
            st = os.lstat(here)
        if stat.S_ISLNK(st.st_mode):
            raise DownloadError(f"{here} is a symbolic link: gptfn does not download through it "
                                f"(nothing outside {cache} is written); remove it")
        if not stat.S_ISDIR(st.st_mode):
            raise DownloadError(f"{here} is not a directory: remove it")


def _remove_entry(path: Path) -> None:
    """Remove ``path`` itself: a link (never its target), a file, or a real directory."""
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)  # a real directory: rmtree removes the links in it, not targets
    else:
        os.unlink(path)


def _unsafe(st: Optional[os.stat_result]) -> bool:
    """A file gptfn must not write into or publish: not a regular file (a symbolic link, a
    directory, a fifo ...) or one with another name elsewhere (a hard link)."""
    return st is not None and (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1)


def _make_staging(staging: Path) -> None:
    """A real staging directory holding only regular files: a link (or anything not a
    directory) in its place is removed (the link, not its target), and so is any link, hard
    link or other non-file in it."""
    st = _lstat(staging)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        os.unlink(staging)
        st = None
    if st is None:
        os.mkdir(staging)
    _clean_staging(staging)


def _clean_staging(staging: Path) -> None:
    with os.scandir(staging) as entries:
        found = [Path(e.path) for e in entries]
    for path in found:
        if _unsafe(_lstat(path)):
            _remove_entry(path)


def _publish(staging: Path, target: Path) -> None:
    """Rename the complete staging directory to ``target``, replacing what was there."""
    st = _lstat(staging)
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise DownloadError(f"{staging} was replaced while gptfn downloaded into it; run again")
    with os.scandir(staging) as entries:
        bad = [e.name for e in entries if _unsafe(_lstat(Path(e.path)))]
    if bad:
        raise DownloadError(f"{staging} holds {', '.join(sorted(bad))}, not (only) regular files "
                            "gptfn wrote: they were not published; run again")
    fsync_dir(staging)
    st = _lstat(target)
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise DownloadError(f"{target} is a symbolic link: gptfn does not replace it; remove it")
    if st is not None and stat.S_ISDIR(st.st_mode):
        shutil.rmtree(target)  # an incomplete or invalid set: never a valid one
    elif st is not None:
        target.unlink()
    os.rename(staging, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def _lock(path: Path, progress: bool) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (where the platform has one)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"gptfn: waiting for another download into {path.parent} to end",
                      file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock (and a kill -9 releases it too)


def _open_lock(path: Path) -> int:
    """The lock file's descriptor, created if need be; a link in its place is removed (the
    link, not its target) and never followed."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
        except OSError as e:
            if _is_link(path):  # ELOOP (or EMLINK on some systems): a link planted there
                os.unlink(path)
                continue
            raise DownloadError(f"cannot open the lock file {path}: {e.strerror or e}") from None
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
        raise DownloadError(f"the lock file {path} is not a regular file: remove it")
    raise DownloadError(f"{path} keeps being replaced by a symbolic link: gptfn does not "
                        "follow it")


def fetch(url: str, dest: Path, session, retries: int = 4, backoff: float = 1.0,
          timeout: float = 30.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``: renamed to ``dest`` only when whole
    and checked (see the module docstring)."""
    import requests

    part = dest.with_name(dest.name + ".part")
    if _unsafe(_lstat(part)):  # a link (or hard link) planted there: removed, never followed
        _remove_entry(part)
    last: Optional[str] = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            expected = _transfer(url, part, session, timeout, progress, dest.name)
        except _Retry as e:
            last = str(e)
            continue
        except (requests.ConnectionError, requests.Timeout) as e:
            last = _describe(e)
            continue
        except requests.exceptions.ChunkedEncodingError as e:
            last = f"transfer cut: {_describe(e)}"
            continue
        break
    else:
        st = _lstat(part)
        kept = f"; the {st.st_size} bytes received are kept in {part} and a retry " \
               f"resumes from there" if st is not None and st.st_size else ""
        raise DownloadError(f"could not download {url} after {retries + 1} attempts: {last}{kept}")
    problem = None
    if expected is not None:
        algo, want = expected
        got = _file_hash(part, algo)
        if got != want:
            problem = f"is corrupt ({algo} {got}, the server states {want})"
    if problem is None:
        try:
            check_file(part, dest.name)
        except BadFile as e:
            problem = str(e)
    if problem is not None:
        part.unlink()
        raise DownloadError(f"{dest.name} from {url} {problem}; it was deleted")
    os.replace(part, dest)
    return dest


def _transfer(url: str, part: Path, session, timeout: float, progress: bool,
              label: str) -> Optional[Tuple[str, str]]:
    """One request for the rest of ``part``; returns the hash the server states, if any."""
    import requests

    st = _lstat(part)
    if _unsafe(st):
        _remove_entry(part)
        st = None
    offset = st.st_size if st is not None else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416 and offset:  # nothing after offset: the .part is suspect
            part.unlink()
            raise _Retry("the server has nothing past the partial file (416): restarting")
        if r.status_code in TRANSIENT_STATUS:
            raise _Retry(f"HTTP {r.status_code} from {url}")
        if r.status_code >= 400:
            what = "not found" if r.status_code == 404 else (r.reason or "error")
            raise DownloadError(f"HTTP {r.status_code} ({what}) for {url}")
        if offset and r.status_code != 206:
            offset = 0  # the server ignored Range: start again from byte 0
        elif r.status_code == 206:
            _check_content_range(r.headers.get("Content-Range"), offset, url)
        length = r.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        bar = byte_bar(total, progress, label, initial=offset)
        try:
            with _open_part(part, append=bool(offset)) as fh:
                for chunk in r.iter_content(CHUNK):
                    fh.write(chunk)
                    bar.update(len(chunk))
                fh.flush()
                os.fsync(fh.fileno())
        except (requests.RequestException, DownloadError):
            raise
        except OSError as e:  # the disk, not the network
            raise DownloadError(f"cannot write {part}: {e.strerror or e}") from None
        finally:
            bar.close()
        size = os.lstat(part).st_size
        if total is not None and size != total:
            raise _Retry(f"got {size} of {total} bytes (Content-Length) from {url}")
        return _expected_hash(r)


def _open_part(part: Path, append: bool):
    """``part`` opened for writing (appending or from byte 0), never through a link: O_NOFOLLOW
    refuses a link before anything is created or truncated."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else 0)
    try:
        fd = os.open(part, flags, 0o666)
    except OSError:
        if _is_link(part):
            raise DownloadError(f"{part} is a symbolic link: gptfn does not write through it "
                                "(it is removed on the next run)") from None
        raise
    st = os.fstat(fd)
    if _unsafe(st):
        os.close(fd)
        raise DownloadError(f"{part} is not a regular file of its own: gptfn does not write "
                            "into it (it is removed on the next run)")
    if not append:
        try:
            os.ftruncate(fd, 0)  # only once it is known to be a file of its own
        except OSError:
            os.close(fd)
            raise
    return os.fdopen(fd, "ab" if append else "wb")


def _check_content_range(value: Optional[str], offset: int, url: str) -> None:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    if not m or int(m.group(1)) != offset:
        raise DownloadError(f"{url}: asked for bytes from {offset}, got Content-Range {value!r}")


def _expected_hash(r) -> Optional[Tuple[str, str]]:
    """(algorithm, hex digest) the server states for the whole file, if any."""
    headers: Dict[str, str] = {}
    for resp in [*r.history, r]:
        headers.update({k.lower(): v for k, v in resp.headers.items()})
    for key in ("x-linked-etag", "etag"):
        tag = headers.get(key, "").strip().strip('"')
        if tag.startswith("W/"):
            continue
        if re.fullmatch(r"[0-9a-f]{64}", tag):
            return "sha256", tag
    for key in ("x-ms-blob-content-md5", "content-md5"):
        if key in headers and not (key == "content-md5" and r.status_code == 206):
            try:
                return "md5", base64.b64decode(headers[key]).hex()
            except ValueError:
                return None
    return None


def _file_hash(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _describe(e: Exception) -> str:
    text = str(e)
    for marker in ("Connection refused", "Name or service not known", "timed out",
                   "Temporary failure in name resolution", "IncompleteRead"):
        if marker in text:
            return marker.lower()
    return text.splitlines()[0][:200] if text else type(e).__name__
