"""Choosing the next token: temperature, top-k, top-p, greedy. Pure, scriptable.

The filters never modify their inputs (``torch.where`` / ``scatter``, not masked writes);
randomness comes in as an explicit ``torch.Generator``. ``temperature == 0`` means greedy.

Symbols: B batch, V vocabulary size.
"""

from typing import Optional

import torch
from torch import Tensor


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep exactly the ``k`` highest logits of each row (ties broken by ``torch.topk``);
    the rest become -inf.

    Shapes: (B, V) -> (B, V).
    """
    k = min(k, logits.size(-1))
    values, indices = torch.topk(logits, k, dim=-1)  # (B, k)
    out = torch.full_like(logits, float("-inf"))
    return out.scatter(-1, indices, values)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of highest-probability tokens whose total
    probability is >= ``p`` (always at least one); the rest become -inf.

    Shapes: (B, V) -> (B, V).
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)  # (B, V)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V): mass of strictly better tokens
    keep_sorted = mass_before < p  # (B, V); the first token always (mass_before = 0 < p)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # back to vocab order
    return torch.where(keep, logits, torch.full_like(logits, float("-inf")))


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """The next token of each row: argmax when ``temperature == 0``, otherwise a sample
    from softmax(logits / temperature) after the top-k (``top_k > 0``) and top-p
    (``top_p < 1``) filters.

    Shapes: logits (B, V) -> (B,) int64.
    """
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).view(-1)  # (B, 1) -> (B,)

