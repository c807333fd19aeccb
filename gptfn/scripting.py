"""TorchScript entry point with exactly its deprecation warnings filtered.

``torch.jit.script`` (and ``torch.jit.script_method``, which it calls for modules) warns
that it is deprecated (DeprecationWarning on torch 2.13, FutureWarning later). gptfn
scripts on purpose (deployments still load TorchScript), so those two messages are
silenced where gptfn calls it, and nothing else.
"""

import warnings
from typing import Any

import torch

_SCRIPT_DEPRECATED = r"`torch\.jit\.script(_method)?` is deprecated"


def script(obj: Any) -> Any:
    """``torch.jit.script(obj)`` without its deprecation warning."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", message=_SCRIPT_DEPRECATED, category=category)
        return torch.jit.script(obj)
