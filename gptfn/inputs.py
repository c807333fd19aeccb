"""Token ids as users pass them, turned into the tensors the core takes, once, at the boundary.

``GPTModel.forward`` (eager), ``generate`` and ``stream`` take ``idx`` (and ``targets``,
``attention_mask``) as a tensor, a Python list or a numpy array. A tensor is used as it is;
``check_tokens`` then names a wrong shape, dtype or id. Anything else is converted
here: a flat list / 1-D array is one row, (1, T); a list of equal-length lists / 2-D array
is (B, T); integer arrays of any width become int64. Text, ragged rows and non-numbers are
named errors. The scripted and compiled model see only tensors: TorchScript itself names the
type of a non-tensor argument.
"""

from __future__ import annotations

from typing import Any, List, Optional, Union

import torch
from torch import Tensor

from gptfn.checks import is_number


def _kind(value: Any) -> str:
    return type(value).__name__


def as_token_rows(
    value: Any, name: str = "idx", device: Optional[Union[torch.device, str]] = None
) -> Tensor:
    """``value`` as a tensor of token ids (or of 0/1 mask values): (1, T) for a flat list or
    1-D array, (B, T) for a list of lists or a 2-D array; a tensor unchanged (its checks are
    ``check_idx``'s).

    Raises TypeError naming ``name`` and the type for text and other non-numbers, and
    ValueError for rows of different lengths.
    """
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (str, bytes)):
        hint = ": encode text first, e.g. BPETokenizer().encode(text)" if name == "idx" else ""
        raise TypeError(f"{name} must be a tensor or a list of ints, got {_kind(value)}{hint}")
    if isinstance(value, (list, tuple)):
        t = _from_lists(value, name)
    elif hasattr(value, "__array__") and hasattr(value, "dtype"):  # numpy and alike
        t = _from_array(value, name)
    else:
        raise TypeError(
            f"{name} must be a (batch, seq_len) tensor, a list of ints or a list of lists, "
            f"got {_kind(value)}"
        )
    if t.numel() == 0:
        t = t.long()  # [] and [[]] come out as float: an empty prompt is check_idx's to name
    if t.dim() == 1:
        t = t.unsqueeze(0)  # (T,) -> (1, T): a flat list is one row
    return t if device is None else t.to(device)


def _from_lists(value: Union[list, tuple], name: str) -> Tensor:
    try:
        if value and all(isinstance(r, Tensor) and r.dim() == 1 for r in value):
            return torch.stack(list(value))  # a list of (T,) tensors -> (B, T)
        return torch.tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        pass
    if value and all(isinstance(r, (list, tuple, Tensor)) for r in value):
        lengths = [len(r) for r in value]
        if len(set(lengths)) > 1:
            shown = lengths if len(lengths) <= 8 else lengths[:8] + ["..."]
            raise ValueError(
                f"{name}'s rows have different lengths {shown}: left-pad them with "
                "gptfn.left_pad and pass its attention_mask to generate"
            )
    for item in _flatten(value):
        if not is_number(item):
            raise TypeError(
                f"{name} must hold ints, got an item of type {_kind(item)}: "
                f"{item!r:.40}"
            )
    raise ValueError(f"{name} could not be read as a tensor of ints: {value!r:.80}")


def _flatten(value: Any) -> List[Any]:
    out: List[Any] = []
    for item in value:
        if isinstance(item, (list, tuple)):
            out.extend(_flatten(item))
        else:
            out.append(item)
    return out


def _from_array(value: Any, name: str) -> Tensor:
    import numpy as np

    arr = np.asarray(value)
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.int64, copy=False)  # uint16 token files, int32 ...
    elif arr.dtype.kind not in "fb":
        raise TypeError(f"{name} must hold ints, got an array of dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def check_tokens(idx: Tensor, vocab_size: int, context_length: int) -> None:
    """The core's ``check_idx``, plus ids read back to the host so that an id outside the
    vocabulary is a ValueError naming it. For the eager entry points (``gpt_forward``,
    ``prefill``, ``decode_step``, ``generate``, ``GPTModel`` given a list): the read is a
    device sync, which compiled and exported code leave to ``check_idx``'s assertion."""
    from gptfn.functional.model import check_idx_shape

    check_idx_shape(idx, context_length)
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise ValueError(f"token id {bad} is outside the vocab [0, {vocab_size})")


def check_targets(targets: Tensor, vocab_size: int, ignore_index: int) -> None:
    """Targets read back to the host, so that one outside ``[0, vocab_size)`` that is not
    ``ignore_index`` is a ValueError naming it. For the places data enters (the training
    loop's batches, ``GPTModel`` given a list): the loss itself asserts the same without a
    device sync (``gptfn.loss.linear_cross_entropy``), so a compiled step takes it whole."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        raise ValueError(f"targets must be token ids in [0, {vocab_size}) or {ignore_index} "
                         f"(ignore_index), got {int(targets[bad][0])}")


def require_tensor(value: Any, name: str = "idx") -> Tensor:
    """``value`` if it is a tensor; else TypeError naming ``name`` and the type (the
    functional entry points take tensors only)."""
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of token ids, got {_kind(value)} "
            f"(torch.tensor({name}) converts a list; GPTModel and generate accept lists)"
        )
    return value
