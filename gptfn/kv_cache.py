"""A static, preallocated KV cache, and prefill / decode_step as pure functions.

The cache is explicit state: per layer one key and one value tensor of fixed shape
(batch, heads, max_len, head size), fixed at creation, plus ``start`` (B,): the first slot
holding a real token in each row (left padding). Functions take it and return it; the
tensors are written in place at slots given as a tensor (so a compiled decode step sees
the same shapes every step and never recompiles).

Generation is ``prefill`` (the whole prompt, slots 0..T-1) then ``decode_step`` (one token
per row at slot T, T+1, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from gptfn.checks import is_int
from gptfn.config import GPTConfig
from gptfn.functional.model import gpt_cached_logits
from gptfn.inputs import check_tokens, require_tensor


@dataclass
class KVCache:
    keys: List[Tensor]  # per layer (B, nh, T_max, hs)
    values: List[Tensor]  # per layer (B, nh, T_max, hs)
    start: Tensor  # (B,) first real slot of each row

    @classmethod
    def create(
        cls,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: Optional[Union[torch.device, str]] = None,
    ) -> "KVCache":
        """A zeroed cache for ``batch_size`` rows of up to ``max_len`` tokens."""
        if not is_int(batch_size) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not is_int(max_len) or max_len <= 0:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        if max_len > config.context_length:
            raise ValueError(
                f"max_len {max_len} exceeds the model's context_length {config.context_length}"
            )
        shape = (batch_size, config.num_heads, max_len, config.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        start = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(keys, values, start)

    @property
    def batch_size(self) -> int:
        return self.keys[0].size(0)

    @property
    def max_len(self) -> int:
        return self.keys[0].size(2)

    def check(self, config: GPTConfig, batch_size: int, length: int) -> None:
        """Raise ValueError unless this cache fits ``batch_size`` rows of ``length`` tokens
        of a model with ``config``."""
        if len(self.keys) != config.num_layers or len(self.values) != config.num_layers:
            raise ValueError(
                f"cache has {len(self.keys)} layers, the model {config.num_layers}"
            )
        want = (config.num_heads, config.head_dim)
        got = (self.keys[0].size(1), self.keys[0].size(3))
        if got != want:
            raise ValueError(f"cache has (heads, head size) {got}, the model {want}")
        if batch_size != self.batch_size:
            raise ValueError(
                f"cache was made for batch_size {self.batch_size}, the input has {batch_size} rows"
            )
        if length > self.max_len:
            raise ValueError(f"{length} tokens do not fit the cache's max_len {self.max_len}")


def prefill(
    params: Dict[str, Tensor],
    idx: Tensor,
    cache: KVCache,
    config: GPTConfig,
    start: Optional[Tensor] = None,
) -> Tuple[Tensor, KVCache]:
    """Run the prompt through the model, filling cache slots 0..T-1.

    ``start`` (B,) gives each row's first real token for left-padded prompts (default
    None: no padding, which lets attention skip the mask over the whole cache).
    Returns the logits of the last position and the cache.

    Shapes: idx (B, T), start (B,) -> logits (B, V).
    """
    check_tokens(require_tensor(idx, "idx"), config.vocab_size, config.context_length)
    b, t = idx.shape
    cache.check(config, b, t)
    unpadded = start is None
    if start is None:
        start = torch.zeros(b, dtype=torch.long, device=idx.device)
    elif start.shape != (b,):
        raise ValueError(f"start must have shape ({b},), got {list(start.shape)}")
    input_pos = torch.arange(t, device=idx.device)  # (T,)
    logits = gpt_cached_logits(
        params, idx, cache.keys, cache.values, input_pos, start,
        config.num_layers, config.num_heads, config.layer_norm_eps,
        last_only=True, unpadded_prefill=unpadded,
    )  # (B, 1, V)
    return logits[:, -1], KVCache(cache.keys, cache.values, start)


def decode_step(
    params: Dict[str, Tensor],
    token: Tensor,
    cache: KVCache,
    input_pos: Tensor,
    config: GPTConfig,
) -> Tuple[Tensor, KVCache]:
    """One new token per row at cache slot ``input_pos`` (a 1-element tensor).

    ``input_pos`` is a tensor, not an int, so a compiled step is not specialised to it.

    Shapes: token (B,) or (B, 1), input_pos (1,) -> logits (B, V).
    """
    token = require_tensor(token, "token").view(-1, 1)  # (B,) -> (B, 1)
    check_tokens(token, config.vocab_size, config.context_length)
    logits = decode_logits(params, token, cache.keys, cache.values, input_pos, cache.start, config)
    return logits, cache


def decode_logits(
    params: Dict[str, Tensor],
    token: Tensor,
    keys: List[Tensor],
    values: List[Tensor],
    input_pos: Tensor,
    start: Tensor,
    config: GPTConfig,
) -> Tensor:
    """The body of a decode step on plain tensors, unchecked: what ``torch.compile`` compiles.

    Shapes: token (B, 1), caches (B, nh, T_max, hs), input_pos (1,), start (B,) -> (B, V).
    """
    logits = gpt_cached_logits(
        params, token, keys, values, input_pos, start,
        config.num_layers, config.num_heads, config.layer_norm_eps,
    )  # (B, 1, V)
    return logits[:, -1]  # (B, V)
