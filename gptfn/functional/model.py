"""GPT-2 as a pure function of a flat parameter dict.

``gpt_forward(params, idx, config) -> logits``. ``params`` uses the GPT-2 hub checkpoint's
key names (``wte.weight``, ``h.{i}.attn.c_attn.weight`` ...; see ``gptfn.params``), weights
``[in, out]``, output head tied to ``wte``.

Every function here except ``gpt_forward`` is ``torch.jit.script``-able. ``gpt_forward``
only unpacks the (frozen dataclass) config into the plain numbers that ``gpt_logits``
takes, because TorchScript cannot take a frozen dataclass as an argument.

Symbols: B batch, T length, C width, V vocabulary size.
"""

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gptfn.functional.attention import attention_mask, multi_head_attention
from gptfn.functional.layers import dropout, feed_forward, linear, unpack_int4


def check_idx(idx: Tensor, vocab_size: int, context_length: int) -> None:
    """Raise ValueError unless ``idx`` is a (B, T) integer tensor with 1 <= T <=
    context_length, and fail (RuntimeError) unless its ids are in the vocabulary.

    The shape checks read only metadata. The value check is ``torch._assert_async``: it
    does not read the ids back to the host, so it costs no device sync and traces whole
    under torch.compile and torch.export (TorchScript drops it, and ``F.embedding`` then
    refuses the id). The eager entry points that take ids from a
    user (``gptfn.inputs.check_tokens``) name the offending id before they get here.
    """
    check_idx_shape(idx, context_length)
    torch._assert_async(
        ((idx >= 0) & (idx < vocab_size)).all(),
        f"token ids must be in the vocab [0, {vocab_size})",
    )


def check_idx_shape(idx: Tensor, context_length: int) -> None:
    """Raise ValueError unless ``idx`` is a (B, T) integer tensor, 1 <= T <= context_length."""
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (batch, seq_len), got {list(idx.shape)}")
    if idx.dtype != torch.long and idx.dtype != torch.int:
        raise ValueError(f"idx must hold integer token ids (int64 or int32), got {idx.dtype}")
    t = idx.size(1)
    if t == 0:
        raise ValueError("idx is empty: seq_len must be at least 1")
    if t > context_length:
        raise ValueError(f"sequence length {t} exceeds context_length {context_length}")


def embed(
    idx: Tensor,
    pos: Tensor,
    wte: Tensor,
    wpe: Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
    wte_scale: Optional[Tensor] = None,
) -> Tensor:
    """Token plus position embeddings, with embedding dropout.

    The activations take ``wpe``'s dtype: a token table in a weight-only format (bf16,
    fp16, or int8 with one scale per token, ``wte_scale``) is widened row by row; an int4
    table (stored ``[C/2, V]``, see ``gptfn.formats``) is unpacked column by column.

    Shapes: idx (B, T), pos (T,) or (B, T), wte (V, C), wpe (T_max, C) -> (B, T, C).
    """
    if wte.dtype == torch.uint8:  # int4: the table is stored as the head's [C, V] weight
        if wte_scale is None:
            raise ValueError("an int4 token table needs its scales")
        ids = idx.reshape(-1)  # (B*T,)
        cols = unpack_int4(wte.index_select(1, ids), wte_scale.index_select(1, ids), wpe.dtype)
        tok = cols.t().reshape(idx.size(0), idx.size(1), -1)  # (C, B*T) -> (B, T, C)
    else:
        tok = F.embedding(idx, wte).to(wpe.dtype)  # (B, T) -> (B, T, C)
        if wte_scale is not None:
            tok = tok * F.embedding(idx, wte_scale.unsqueeze(1))  # (B, T, C) * (B, T, 1)
    x = tok + F.embedding(pos, wpe)  # (B, T, C)
    return dropout(x, dropout_p, training)


def transformer_block(
    x: Tensor,
    ln_1_weight: Tensor,
    ln_1_bias: Tensor,
    c_attn_weight: Tensor,
    c_attn_bias: Optional[Tensor],
    attn_c_proj_weight: Tensor,
    attn_c_proj_bias: Tensor,
    ln_2_weight: Tensor,
    ln_2_bias: Tensor,
    c_fc_weight: Tensor,
    c_fc_bias: Tensor,
    mlp_c_proj_weight: Tensor,
    mlp_c_proj_bias: Tensor,
    num_heads: int,
    eps: float,
    dropout_p: float = 0.0,
    training: bool = False,
    k_cache: Optional[Tensor] = None,
    v_cache: Optional[Tensor] = None,
    input_pos: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    c_attn_scale: Optional[Tensor] = None,
    attn_c_proj_scale: Optional[Tensor] = None,
    c_fc_scale: Optional[Tensor] = None,
    mlp_c_proj_scale: Optional[Tensor] = None,
) -> Tensor:
    """One pre-LN GPT-2 block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    Dropout (training only) acts on the attention weights and on each branch's output
    before it joins the residual stream. The cache arguments go to
    ``multi_head_attention``; the scales belong to int8 weights (``linear``).

    Shapes: x (B, T, C) -> (B, T, C).
    """
    c = x.size(-1)
    h = F.layer_norm(x, [c], ln_1_weight, ln_1_bias, eps)  # (B, T, C)
    h = multi_head_attention(
        h, c_attn_weight, c_attn_bias, attn_c_proj_weight, attn_c_proj_bias, num_heads,
        dropout_p=dropout_p, training=training, k_cache=k_cache, v_cache=v_cache,
        input_pos=input_pos, attn_mask=attn_mask,
        c_attn_scale=c_attn_scale, c_proj_scale=attn_c_proj_scale,
    )  # (B, T, C)
    x = x + dropout(h, dropout_p, training)
    h = F.layer_norm(x, [c], ln_2_weight, ln_2_bias, eps)  # (B, T, C)
    h = feed_forward(
        h, c_fc_weight, c_fc_bias, mlp_c_proj_weight, mlp_c_proj_bias,
        c_fc_scale=c_fc_scale, c_proj_scale=mlp_c_proj_scale,
    )  # (B, T, C)
    return x + dropout(h, dropout_p, training)


def lm_head(
    x: Tensor,
    ln_f_weight: Tensor,
    ln_f_bias: Tensor,
    wte: Tensor,
    eps: float,
    wte_scale: Optional[Tensor] = None,
) -> Tensor:
    """Final layer norm, then the output head tied to the token embedding.

    Shapes: x (B, T, C), wte (V, C) -> logits (B, T, V).
    """
    return tied_head(final_norm(x, ln_f_weight, ln_f_bias, eps), wte, wte_scale)


def final_norm(x: Tensor, ln_f_weight: Tensor, ln_f_bias: Tensor, eps: float) -> Tensor:
    """The last layer norm (``ln_f``). Shapes: (B, T, C) -> (B, T, C)."""
    return F.layer_norm(x, [x.size(-1)], ln_f_weight, ln_f_bias, eps)


def tied_head(x: Tensor, wte: Tensor, wte_scale: Optional[Tensor] = None) -> Tensor:
    """Logits from final hidden states: ``x @ wte.T``.

    A table in a weight-only format is widened and scaled per row, as in ``linear``; an
    int4 table is ``linear``'s int4 weight.

    Shapes: x (B, T, C), wte (V, C), wte_scale (V,) or None -> (B, T, V); int4: wte
    (C/2, V), wte_scale (C/32, V).
    """
    if wte.dtype == x.dtype and wte_scale is None:
        return F.linear(x, wte)  # (B, T, C) @ (C, V) -> (B, T, V)
    if wte.dtype == torch.uint8:  # int4: the table is stored as this product's [C, V] weight
        return linear(x, wte, None, wte_scale)  # (B, T, C) -> (B, T, V)
    logits = F.linear(x, wte.to(x.dtype))  # (B, T, C) @ (C, V) -> (B, T, V)
    return logits if wte_scale is None else logits * wte_scale  # one scale per token


def block_forward(
    params: Dict[str, Tensor],
    i: int,
    x: Tensor,
    num_heads: int,
    eps: float,
    dropout_p: float = 0.0,
    training: bool = False,
    k_cache: Optional[Tensor] = None,
    v_cache: Optional[Tensor] = None,
    input_pos: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
) -> Tensor:
    """Block ``i`` of ``params``: reads ``h.{i}.*`` and calls ``transformer_block``.

    Shapes: x (B, T, C) -> (B, T, C).
    """
    p = f"h.{i}."
    return transformer_block(
        x,
        ln_1_weight=params[p + "ln_1.weight"],
        ln_1_bias=params[p + "ln_1.bias"],
        c_attn_weight=params[p + "attn.c_attn.weight"],
        c_attn_bias=params.get(p + "attn.c_attn.bias"),
        attn_c_proj_weight=params[p + "attn.c_proj.weight"],
        attn_c_proj_bias=params[p + "attn.c_proj.bias"],
        ln_2_weight=params[p + "ln_2.weight"],
        ln_2_bias=params[p + "ln_2.bias"],
        c_fc_weight=params[p + "mlp.c_fc.weight"],
        c_fc_bias=params[p + "mlp.c_fc.bias"],
        mlp_c_proj_weight=params[p + "mlp.c_proj.weight"],
        mlp_c_proj_bias=params[p + "mlp.c_proj.bias"],
        num_heads=num_heads,
        eps=eps,
        dropout_p=dropout_p,
        training=training,
        k_cache=k_cache,
        v_cache=v_cache,
        input_pos=input_pos,
        attn_mask=attn_mask,
        c_attn_scale=params.get(p + "attn.c_attn.weight_scale"),
        attn_c_proj_scale=params.get(p + "attn.c_proj.weight_scale"),
        c_fc_scale=params.get(p + "mlp.c_fc.weight_scale"),
        mlp_c_proj_scale=params.get(p + "mlp.c_proj.weight_scale"),
    )


def head_of(params: Dict[str, Tensor], x: Tensor, eps: float) -> Tensor:
    """``lm_head`` with ``params``' final norm and (tied) token table."""
    return lm_head(
        x, params["ln_f.weight"], params["ln_f.bias"], params["wte.weight"], eps,
        params.get("wte.weight_scale"),
    )


def embed_of(params: Dict[str, Tensor], idx: Tensor, pos: Tensor,
             dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """``embed`` with ``params``' token and position tables."""
    return embed(idx, pos, params["wte.weight"], params["wpe.weight"], dropout_p=dropout_p,
                 training=training, wte_scale=params.get("wte.weight_scale"))


def gpt_logits(
    params: Dict[str, Tensor],
    idx: Tensor,
    num_layers: int,
    num_heads: int,
    eps: float,
    vocab_size: int,
    context_length: int,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """GPT-2's forward pass with the config spelt out as plain numbers (scriptable).

    Shapes: idx (B, T) -> logits (B, T, V).
    """
    check_idx(idx, vocab_size, context_length)
    pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
    x = embed_of(params, idx, pos, dropout_p=dropout_p, training=training)  # (B, T, C)
    for i in range(num_layers):
        x = block_forward(
            params, i, x, num_heads, eps, dropout_p=dropout_p, training=training
        )  # (B, T, C)
    return head_of(params, x, eps)


def gpt_cached_logits(
    params: Dict[str, Tensor],
    idx: Tensor,
    k_caches: List[Tensor],
    v_caches: List[Tensor],
    input_pos: Tensor,
    start: Tensor,
    num_layers: int,
    num_heads: int,
    eps: float,
    last_only: bool = False,
    unpadded_prefill: bool = False,
) -> Tensor:
    """The forward pass of new tokens against a KV cache (inference: no dropout).

    ``idx`` holds the tokens at cache slots ``input_pos`` (the same slots in every row);
    row b's real tokens start at slot ``start[b]`` (left padding), so a token at slot s has
    position s - start[b]. The keys and values of the new tokens are written into
    ``k_caches[i]`` / ``v_caches[i]`` in place. ``idx`` is not checked here (callers check
    once, outside the decode loop, to keep device syncs out of it). With ``last_only`` only
    the last position's logits are computed (what prefill needs). ``unpadded_prefill`` says
    that ``idx`` fills slots 0..T-1 of rows without padding (``start`` all 0, unchecked),
    whose attention then needs no mask over the whole cache.

    Shapes: idx (B, T), caches (B, nh, T_max, hs), input_pos (T,), start (B,)
    -> logits (B, T, V), or (B, 1, V) with last_only.
    """
    pos = (input_pos.view(1, -1) - start.view(-1, 1)).clamp(min=0)  # (B, T)
    mask: Optional[Tensor] = None
    if not unpadded_prefill:
        mask = attention_mask(input_pos, start, k_caches[0].size(2))  # (B, 1, T, T_max)
    x = embed_of(params, idx, pos)  # (B, T, C)
    for i in range(num_layers):
        x = block_forward(
            params, i, x, num_heads, eps,
            k_cache=k_caches[i], v_cache=v_caches[i], input_pos=input_pos, attn_mask=mask,
        )  # (B, T, C)
    if last_only:
        x = x[:, -1:]  # (B, T, C) -> (B, 1, C)
    return head_of(params, x, eps)


def gpt_forward(
    params: Dict[str, Tensor],
    idx: Tensor,
    config,
    training: bool = False,
    cache=None,
    input_pos: Optional[Tensor] = None,
) -> Tensor:
    """GPT-2's forward pass: ``logits = gpt_forward(params, idx, config)``.

    ``config`` is a ``gptfn.GPTConfig``. Dropout is active only when ``training``. With a
    ``gptfn.KVCache`` and ``input_pos`` (the cache slots of ``idx``'s tokens) the keys and
    values are written into the cache and attention covers everything cached so far.

    Shapes: idx (B, T), input_pos (T,) -> logits (B, T, V).
    """
    if not isinstance(idx, torch.Tensor):  # the core takes tensors; GPTModel takes lists too
        raise TypeError(
            f"idx must be a torch.Tensor of token ids, got {type(idx).__name__} "
            "(torch.tensor(idx) converts a list; GPTModel and generate accept lists)"
        )
    if cache is None:
        return gpt_logits(
            params, idx, config.num_layers, config.num_heads, config.layer_norm_eps,
            config.vocab_size, config.context_length, dropout_p=config.dropout_rate,
            training=training,
        )
    if input_pos is None:
        raise ValueError("input_pos (the cache slots of idx's tokens) is needed with a cache")
    if training:
        raise ValueError("a KV cache is for inference: training must be False")
    check_idx(idx, config.vocab_size, config.context_length)
    if input_pos.shape != (idx.size(1),):
        raise ValueError(
            f"input_pos must have shape ({idx.size(1)},), got {list(input_pos.shape)}"
        )
    return gpt_cached_logits(
        params, idx, cache.keys, cache.values, input_pos, cache.start,
        config.num_layers, config.num_heads, config.layer_norm_eps,
    )
