"""The three attention variants of the GPTModelV1 API, as pure functions.

- ``self_attention``: one head, separate W_q, W_k, W_v, no mask (written out).
- ``causal_attention``: the same with a causal mask and dropout on the weights (written out).
- ``multi_head_attention``: GPT-2's fused qkv projection, heads in parallel, causal,
  output projection, via ``F.scaled_dot_product_attention`` (the fast path).

Weights are ``[in, out]``. Every function here is ``torch.jit.script``-able.
Symbols: B batch, T length, C width, nh heads, hs head size (C // nh).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gptfn.functional.layers import dropout, linear


def single_head_attention(
    x: Tensor,
    w_query: Tensor,
    w_key: Tensor,
    w_value: Tensor,
    b_query: Optional[Tensor],
    b_key: Optional[Tensor],
    b_value: Optional[Tensor],
    causal: bool,
    dropout_p: float,
    training: bool,
) -> Tensor:
    """Scaled dot-product attention of one head, written out; optionally causal, with
    dropout on the attention weights (training only).

    Shapes: x (B, T, d_in) or (T, d_in); w_* (d_in, d_out) -> (B, T, d_out) or (T, d_out).
    """
    q = linear(x, w_query, b_query)  # (B, T, d_in) -> (B, T, d_out)
    k = linear(x, w_key, b_key)  # (B, T, d_in) -> (B, T, d_out)
    v = linear(x, w_value, b_value)  # (B, T, d_in) -> (B, T, d_out)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, T, T)
    if causal:
        t = x.size(-2)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # (T, T)
        scores = torch.where(future, torch.full_like(scores, float("-inf")), scores)
    weights = dropout(torch.softmax(scores, dim=-1), dropout_p, training)  # (B, T, T)
    return torch.matmul(weights, v)  # (B, T, T) @ (B, T, d_out) -> (B, T, d_out)


def self_attention(
    x: Tensor,
    w_query: Tensor,
    w_key: Tensor,
    w_value: Tensor,
    b_query: Optional[Tensor] = None,
    b_key: Optional[Tensor] = None,
    b_value: Optional[Tensor] = None,
) -> Tensor:
    """Scaled dot-product self-attention of one head, with no mask.

    Shapes: x (B, T, d_in) or (T, d_in); w_* (d_in, d_out) -> (B, T, d_out) or (T, d_out).
    """
    return single_head_attention(
        x, w_query, w_key, w_value, b_query, b_key, b_value,
        causal=False, dropout_p=0.0, training=False,
    )


def causal_attention(
    x: Tensor,
    w_query: Tensor,
    w_key: Tensor,
    w_value: Tensor,
    b_query: Optional[Tensor] = None,
    b_key: Optional[Tensor] = None,
    b_value: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Single-head self-attention where position t attends to positions <= t only.

    Dropout (rate ``dropout_p``, training only) is applied to the attention weights.

    Shapes: x (B, T, d_in) or (T, d_in); w_* (d_in, d_out) -> (B, T, d_out) or (T, d_out).
    """
    return single_head_attention(
        x, w_query, w_key, w_value, b_query, b_key, b_value,
        causal=True, dropout_p=dropout_p, training=training,
    )


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """Shapes: (B, T, C) -> (B, nh, T, hs)."""
    b, t, c = x.size()
    return x.view(b, t, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """Shapes: (B, nh, T, hs) -> (B, T, C)."""
    b, nh, t, hs = x.size()
    return x.transpose(1, 2).reshape(b, t, nh * hs)


def multi_head_attention(
    x: Tensor,
    c_attn_weight: Tensor,
    c_attn_bias: Optional[Tensor],
    c_proj_weight: Tensor,
    c_proj_bias: Tensor,
    num_heads: int,
    dropout_p: float = 0.0,
    training: bool = False,
    k_cache: Optional[Tensor] = None,
    v_cache: Optional[Tensor] = None,
    input_pos: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    c_attn_scale: Optional[Tensor] = None,
    c_proj_scale: Optional[Tensor] = None,
) -> Tensor:
    """GPT-2's causal multi-head attention: fused qkv, heads in parallel, output projection.

    ``c_attn_weight`` packs [W_q | W_k | W_v] along its output dimension, as GPT-2's
    checkpoint does. Dropout (training only) acts on the attention weights; the residual
    dropout after the projection belongs to ``transformer_block``.

    With a KV cache (``k_cache``, ``v_cache`` and ``input_pos`` given) the new keys and
    values are written into the cache at slots ``input_pos`` (in place: the cache is state
    the caller passes in and keeps). With ``attn_mask`` the queries attend over the whole
    cache under it (see ``gptfn.functional.attention_mask``). Without it the new tokens must
    be the first ones of unpadded rows (slots 0..T-1: a prefill), and attention is causal
    over them alone, as without a cache (the fused causal kernel; no (T, T_max) mask).
    The scales belong to int8 weights (see ``gptfn.functional.linear``).

    Shapes: x (B, T, d_in), c_attn_weight (d_in, 3 d_out), c_proj_weight (d_out, d_out)
    -> (B, T, d_out); caches (B, nh, T_max, hs), input_pos (T,), attn_mask (B, 1, T, T_max).
    """
    qkv = linear(x, c_attn_weight, c_attn_bias, c_attn_scale)  # (B, T, d_in) -> (B, T, 3 d_out)
    q, k, v = qkv.chunk(3, dim=-1)  # 3 x (B, T, d_out)
    q = split_heads(q, num_heads)  # (B, T, d_out) -> (B, nh, T, hs)
    k = split_heads(k, num_heads)  # (B, T, d_out) -> (B, nh, T, hs)
    v = split_heads(v, num_heads)  # (B, T, d_out) -> (B, nh, T, hs)
    p = dropout_p if training else 0.0
    mask: Optional[Tensor] = None  # None: causal over k, v alone (no cache, or a prefill)
    if k_cache is not None and v_cache is not None and input_pos is not None:
        k_cache[:, :, input_pos] = k  # (B, nh, T, hs) -> slots of (B, nh, T_max, hs)
        v_cache[:, :, input_pos] = v
        if attn_mask is not None:  # over the whole cache, under the mask
            k, v, mask = k_cache, v_cache, attn_mask  # (B, nh, T_max, hs), (B, 1, T, T_max)
        # else a prefill of unpadded rows: the cache holds nothing older than k, v
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                       is_causal=mask is None)  # (B, nh, T, hs)
    y = merge_heads(y)  # (B, nh, T, hs) -> (B, T, d_out)
    return linear(y, c_proj_weight, c_proj_bias, c_proj_scale)  # (B, T, d_out) -> (B, T, d_out)


def attention_mask(input_pos: Tensor, start: Tensor, max_len: int) -> Tensor:
    """Which cache slots each new token may attend to, for left-padded rows.

    Row b's real tokens occupy slots ``start[b]`` onward. A token at slot ``s`` attends to
    slots ``j`` with ``start[b] <= j <= s``; a padding token (``s < start[b]``) attends to
    itself only, so that its (unused) output stays finite.

    Shapes: input_pos (T,), start (B,) -> (B, 1, T, T_max) bool.
    """
    j = torch.arange(max_len, device=input_pos.device)  # (T_max,)
    s = input_pos.view(1, -1, 1)  # (1, T, 1)
    causal = j.view(1, 1, -1) <= s  # (1, T, T_max)
    real = j.view(1, 1, -1) >= start.view(-1, 1, 1)  # (B, 1, T_max)
    itself = j.view(1, 1, -1) == s  # (1, T, T_max)
    return (causal & (real | itself)).unsqueeze(1)  # (B, 1, T, T_max)
