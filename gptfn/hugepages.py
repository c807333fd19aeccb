"""Weights in 2 MB pages, for streaming them: ``huge_pages(model_or_params)``.

A decode step reads every weight once, in order, so its speed is the speed at which memory
streams the weights. In 4 KB pages the hardware prefetchers stop at each page boundary and
every page takes a TLB entry of its own; in the 2 MB pages of Linux's transparent huge pages
the same read streams faster (README, "Weight formats": the measured gain). torch allocates
tensors in 4 KB pages unless the system makes every mapping huge (THP "always"; the common
setting is "madvise"), so a caller that decodes copies its weights, once, into one mapping
advised ``MADV_HUGEPAGE``: a placement of the data, chosen by the caller as a weight format
is, never a branch in the core. Where the advice does not exist (not Linux) or is refused
(THP "never"), the copy is an ordinary one in ordinary pages and nothing else changes.
"""

from __future__ import annotations

import mmap
from typing import Dict, Iterable, Mapping, Tuple, Union

import torch
from torch import Tensor

_HUGE = 2 << 20  # the x86-64 and arm64 transparent huge page
_ALIGN = 4096  # each tensor's start: a page, and far past any vector load's alignment


def arena(nbytes: int) -> Tensor:
    """A zeroed uint8 tensor of ``nbytes`` over an anonymous mapping advised
    ``MADV_HUGEPAGE`` (where the OS has the advice), starting on a 2 MB boundary. The
    tensor keeps the mapping alive."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    mapping = mmap.mmap(-1, nbytes + _HUGE, **({"flags": flags} if flags else {}))
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            mapping.madvise(advice)
        except OSError:  # a kernel without transparent huge pages: ordinary pages
            pass
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # holds a reference to mapping
    start = (-whole.data_ptr()) % _HUGE
    return whole[start:start + nbytes]


def place(tensors: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Contiguous copies of the CPU tensors of ``tensors``, all in one ``arena``, each
    starting on a 4 KB boundary; tensors on other devices as they are. The inputs are not
    modified."""
    cpu = {k: t for k, t in tensors.items() if t.device.type == "cpu"}
    placed = place_each({k: t.numel() * t.element_size() for k, t in cpu.items()},
                        cpu.items())
    return {k: placed.get(k, t) for k, t in tensors.items()}


def place_each(nbytes: Mapping[str, int],
               tensors: Iterable[Tuple[str, Tensor]]) -> Dict[str, Tensor]:
    """``place`` for CPU tensors that arrive one at a time (read from a file, say):
    ``nbytes`` gives each one's size, or a bound on it, in advance, so the arena is made
    first and each tensor can be dropped once copied; holding them all until then would
    hold the weights twice."""
    sizes = {k: -(-n // _ALIGN) * _ALIGN for k, n in nbytes.items()}
    starts, offset = {}, 0
    for key, size in sizes.items():
        starts[key], offset = offset, offset + size
    buffer = arena(max(offset, 1))
    out: Dict[str, Tensor] = {}
    for key, t in tensors:
        n = t.numel() * t.element_size()
        if n > nbytes[key]:
            raise ValueError(f"{key}: {n} bytes, more than the {nbytes[key]} announced")
        copy = buffer[starts[key]:starts[key] + n].view(t.dtype).view(t.shape)  # (*t.shape)
        copy.copy_(t.detach())
        out[key] = copy
    return out


def huge_pages(model_or_params: Union["torch.nn.Module", Mapping[str, Tensor]]):
    """``model_or_params`` with its weights copied into 2 MB pages (see the module
    docstring): a new ``GPTModel`` for a model (in any weight format), a new dict for a
    parameter dict. The input is not modified; drop it to free its memory."""
    from gptfn.modules import GPTModel, params_of

    if isinstance(model_or_params, Mapping):
        return place(model_or_params)
    model = getattr(model_or_params, "_orig_mod", model_or_params)
    if not isinstance(model, GPTModel):
        raise TypeError(f"huge_pages takes a GPTModel or a parameter dict, got "
                        f"{type(model_or_params).__name__}")
    placed = GPTModel(model.config, params=place(params_of(model)))
    return placed.train(model.training)
