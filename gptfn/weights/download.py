"""``gptfn.download``: GPT-2 weights into gptfn's cache, resumable, offline-first.

Sources:

- ``hf`` (default): ``config.json`` and ``model.safetensors`` of the hub repositories
  ``openai-community/{gpt2,gpt2-medium,gpt2-large,gpt2-xl}``, fetched from
  ``{base}/{repo}/resolve/main/{file}``; base ``https://huggingface.co``, or ``HF_ENDPOINT``,
  or ``base_url``. Cached in ``CACHE/hf/{repo}/``.
- ``openai``: the seven files of OpenAI's release for a size (124M, 355M, 774M, 1558M) from
  ``{base}/models/{size}/{file}``; base OpenAI's public GPT-2 storage, or
  ``GPTFN_OPENAI_BASE_URL``, or ``base_url``. Cached in ``CACHE/openai/models/{size}/``.

``CACHE`` is ``cache_dir``, else ``$GPTFN_CACHE_DIR``, else ``$XDG_CACHE_HOME/gptfn``, else
``~/.cache/gptfn``. Files already in the cache are used with no network at all.

Each file streams into ``NAME.part`` (a tqdm bar per file) and is renamed to ``NAME`` only
when whole: its size matches Content-Length and, where the server states one, its hash
matches (the hub's sha256 ``X-Linked-Etag`` / ``ETag`` of large files; Azure's
``Content-MD5`` / ``x-ms-blob-content-md5``). An interrupted transfer resumes from the
``.part`` file with a Range request (and restarts cleanly when the server ignores Range).
Connection errors, time-outs, cut transfers, 429 and 5xx are retried with exponential
backoff; other HTTP errors are not. A corrupt file is deleted; partial data is only ever
kept as a resumable ``.part``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from gptfn.config import PRESET_ALIASES, PRESETS
from gptfn.progress import byte_bar
from gptfn.weights.resolve import HF_REPOS, cache_dir as default_cache_dir

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
OPENAI_SIZES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK = 1 << 16  # written as it comes: a cut transfer keeps all but the last chunk


class DownloadError(OSError):
    """A download that failed for good (after retries, where retrying made sense)."""


class _Retry(Exception):
    """A transient failure: try again (resuming from the .part file)."""


def canonical_name(name: str) -> str:
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        known = ", ".join(list(PRESETS) + list(PRESET_ALIASES))
        raise ValueError(f"unknown model name {name!r}; known names: {known}")
    return key


def plan(
    name: str,
    source: str = "hf",
    base_url: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> Tuple[Path, List[Tuple[str, str]]]:
    """(target directory, [(file name, url)]) for a model and source."""
    key = canonical_name(name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
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


def is_cached(name: str, source: str = "hf", cache_dir=None) -> bool:
    target, files = plan(name, source, None, cache_dir)
    return all((target / f).is_file() for f, _ in files)


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
    directory that holds them. Files already cached are not fetched again."""
    target, files = plan(name, source, base_url, cache_dir)
    missing = [(f, url) for f, url in files if not (target / f).is_file()]
    if not missing:
        return target
    if os.environ.get("GPTFN_OFFLINE") or os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        raise DownloadError(
            f"{name} is not in the cache ({target} lacks {', '.join(f for f, _ in missing)}) "
            "and downloads are disabled (GPTFN_OFFLINE / HF_HUB_OFFLINE)"
        )
    import requests

    target.mkdir(parents=True, exist_ok=True)
    with requests.Session() as session:
        session.headers["User-Agent"] = "gptfn"
        for fname, url in missing:
            fetch(url, target / fname, session, retries=retries, backoff=backoff,
                  timeout=timeout, progress=progress)
    return target


def fetch(url: str, dest: Path, session, retries: int = 4, backoff: float = 1.0,
          timeout: float = 30.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part`` (see the module docstring)."""
    import requests

    part = dest.with_name(dest.name + ".part")
    last: Optional[str] = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _transfer(url, part, session, timeout, progress, dest.name)
        except _Retry as e:
            last = str(e)
            continue
        except (requests.ConnectionError, requests.Timeout) as e:
            last = _describe(e)
            continue
        except requests.exceptions.ChunkedEncodingError as e:
            last = f"transfer cut: {_describe(e)}"
            continue
        os.replace(part, dest)
        return dest
    kept = f"; the {part.stat().st_size} bytes received are kept in {part} and a retry resumes " \
           f"from there" if part.exists() and part.stat().st_size else ""
    raise DownloadError(f"could not download {url} after {retries + 1} attempts: {last}{kept}")


def _transfer(url: str, part: Path, session, timeout: float, progress: bool, label: str) -> None:
    offset = part.stat().st_size if part.exists() else 0
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
            with open(part, "ab" if offset else "wb") as fh:
                for chunk in r.iter_content(CHUNK):
                    fh.write(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()
        size = part.stat().st_size
        if total is not None and size != total:
            raise _Retry(f"got {size} of {total} bytes (Content-Length) from {url}")
        expected = _expected_hash(r)
    if expected is not None:
        algo, want = expected
        got = _file_hash(part, algo)
        if got != want:
            part.unlink()
            raise DownloadError(
                f"{url}: the downloaded file is corrupt ({algo} {got}, the server states "
                f"{want}); it was deleted"
            )


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
    with open(path, "rb") as fh:
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
