"""From a model name or a path to the files of a checkpoint: one policy for the library
(``GPTModel.from_pretrained``) and every command (``--model``).

A path that exists is used as it is (a directory with model.safetensors + config.json, a
.safetensors file, an OpenAI TF release directory). Anything else is a model name (``gpt2``
... ``gpt2-xl``, or ``124M`` ...), whose hub files are looked up in gptfn's cache (see
``gptfn.weights.download``) and downloaded there when they are missing, unless the caller
says not to or ``GPTFN_OFFLINE`` forbids the network: then ``NotCached`` says how to get
them. A value that can only be a path (``./x``, ``a/b``, ``m.safetensors`` ...) and does not
exist is a ``FileNotFoundError``, never a name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from gptfn.config import MODEL_NAMES, preset_name
from gptfn.weights.download import download, is_cached, offline, plan


class NotCached(FileNotFoundError):
    """A model name whose files are not in the cache, and which may not be downloaded."""


def locate(
    model: Union[str, os.PathLike],
    allow_download: bool = True,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> Path:
    """The checkpoint that ``model`` (a path or a model name) means, downloading a named one
    first when it is not cached and ``allow_download`` is true (see the module docstring)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    text = str(model)
    if looks_like_path(text):
        raise FileNotFoundError(f"no such checkpoint file or directory: {path} (and {text!r} "
                                f"is not a model name: {', '.join(MODEL_NAMES)})")
    name = preset_name(text)  # an unknown name is a ValueError naming the known ones
    where = plan(name, cache_dir=cache_dir)[0]
    if is_cached(name, cache_dir=cache_dir):
        return where
    forbidden = offline()
    if allow_download and not forbidden:
        return download(text, cache_dir=cache_dir)
    why = f" and downloads are disabled ({forbidden})" if forbidden else ""
    raise NotCached(f"no pretrained weights for {text!r} in {where}{why}: download them with "
                    f"`gptfn download {text}` (or set GPTFN_CACHE_DIR to a cache that has "
                    "them), or give a checkpoint path instead")


def looks_like_path(text: str) -> bool:
    """A --model value that can only mean a file: it has a directory part, starts with ``.``
    or ``~``, or ends like a weights or config file."""
    return ("/" in text or os.sep in text or text.startswith((".", "~"))
            or text.endswith((".safetensors", ".json", ".bin", ".pt")))
