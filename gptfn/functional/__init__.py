"""The pure core: GPT-2 as functions of explicit tensors (torch and typing only).

Every function is ``torch.jit.script``-able except ``gpt_forward``, the thin entry point
that unpacks a ``GPTConfig`` into the plain numbers ``gpt_logits`` takes.
"""

from gptfn.functional.attention import (
    attention_mask,
    causal_attention,
    merge_heads,
    multi_head_attention,
    self_attention,
    single_head_attention,
    split_heads,
)
from gptfn.functional.layers import dropout, feed_forward, gelu, layer_norm, linear
from gptfn.functional.sampling import sample_next, top_k_filter, top_p_filter
from gptfn.functional.model import (
    block_forward,
    check_idx,
    embed,
    final_norm,
    gpt_cached_logits,
    gpt_forward,
    gpt_logits,
    lm_head,
    tied_head,
    transformer_block,
)

__all__ = [
    "attention_mask",
    "block_forward",
    "causal_attention",
    "check_idx",
    "dropout",
    "embed",
    "feed_forward",
    "final_norm",
    "gelu",
    "gpt_cached_logits",
    "gpt_forward",
    "gpt_logits",
    "layer_norm",
    "linear",
    "lm_head",
    "merge_heads",
    "multi_head_attention",
    "self_attention",
    "single_head_attention",
    "split_heads",
    "sample_next",
    "top_k_filter",
    "top_p_filter",
    "tied_head",
    "transformer_block",
]
