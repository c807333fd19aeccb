"""Text generation: prefill the prompt, then one decode step per new token.

(This module is ``generation``, not ``generate``: a submodule of that name would shadow the
function ``gptfn.generate`` on the package.)

``generate(model, idx, max_new_tokens, ...)`` returns the full sequences, as the original
design's generate did; ``stream(...)`` yields the new tokens (and their text) as they
come. Both run the functional core on the model's parameters, with a static KV cache.
With ``compile=True`` the decode step alone is compiled (``fullgraph=True``; CUDA graphs via
``mode="reduce-overhead"`` on a GPU): its inputs keep their shapes from step to step and
the position is a tensor, so it compiles once per generation and not per step, and a later
generation of other shapes compiles once more with those sizes symbolic (``_CAPTURES``).
Sampling, EOS checks and tokenization stay outside compiled code.

A prompt longer than the context, or prompt + max_new_tokens beyond it, is an error:
there is no sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from gptfn.checks import is_int, is_number
from gptfn.config import GPTConfig
from gptfn.formats import scheme_of
from gptfn.functional.sampling import sample_next
from gptfn.inputs import as_token_rows, check_tokens
from gptfn.kv_cache import KVCache, decode_logits, prefill
from gptfn.modules import params_of

ModelLike = Union[nn.Module, Tuple[GPTConfig, Mapping[str, Tensor]]]


def model_parts(model: ModelLike) -> Tuple[GPTConfig, Dict[str, Tensor]]:
    """(config, params) of a GPTModel (compiled or not) or of a (config, params) pair."""
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], GPTConfig):
        return model[0], dict(model[1])
    base = getattr(model, "_orig_mod", model)
    config = getattr(base, "config", None)
    if not isinstance(base, nn.Module) or not isinstance(config, GPTConfig):
        raise ValueError("model must be a GPTModel or a (GPTConfig, params) pair")
    return config, params_of(base)


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Raise ValueError naming the sampling argument that is out of range."""
    if not is_number(temperature) or not 0.0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (not is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> Tuple[Tensor, Tensor]:
    """Prompts of different lengths -> (idx, attention_mask), left-padded with ``pad_id``.

    Shapes: -> idx (B, T_max), attention_mask (B, T_max) with 0 on padding.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (an empty prompt was given)")
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return idx, mask


def _pad_starts(attention_mask: Optional[Tensor], idx: Tensor) -> Optional[Tensor]:
    """(B,) first real position of each row, checking the mask is left padding; None
    without a mask (no padding: ``prefill``'s default, its unmasked fast path)."""
    b, t = idx.shape
    if attention_mask is None:
        return None
    if attention_mask.shape != idx.shape:
        raise ValueError(
            f"attention_mask must have the shape of idx {list(idx.shape)}, "
            f"got {list(attention_mask.shape)}"
        )
    m = attention_mask.to(idx.device)
    bad = (m != 0) & (m != 1)  # before any cast: a float 0.5 must not become 0
    if bool(bad.any()):
        raise ValueError(
            f"attention_mask must hold only 0 (padding) and 1 (tokens), got {m[bad][0].item()}"
        )
    m = m.long()
    start = t - m.sum(dim=1)  # (B,)
    expected = (torch.arange(t, device=idx.device).view(1, -1) >= start.view(-1, 1)).long()
    if not torch.equal(m, expected):
        raise ValueError("attention_mask must be left padding: zeros, then ones, in each row")
    if bool((start == t).any()):
        raise ValueError("a row of attention_mask has no tokens (an empty prompt)")
    return start


def decode_function(params: Mapping[str, Tensor], config: GPTConfig,
                    compile: bool) -> Callable[..., Tensor]:
    """The decode step generation runs: ``decode_logits`` itself, or compiled.

    This is where the route is chosen, once. On the CPU, a compiled fp32 step (plain or with
    matrices in a format, ``gptfn.formats``) gets its products rewritten onto gptfn's kernel
    (``gptfn.kernels.route``), then compiled by inductor; an eager step of a model in a
    format gets the same rewrite and runs as it is; a plain eager step is the core itself.
    The prompt's prefill keeps the core's plain products (many rows: compute-bound).
    """
    device = params["wte.weight"].device
    fp32 = params["wpe.weight"].dtype == torch.float32
    if device.type == "cpu" and compile and fp32:
        from gptfn.kernels import route

        return torch.compile(_decode_compiled_with_kernels, fullgraph=True, dynamic=None,
                             recompile_limit=_CAPTURES, backend=route.rowmul_inductor)
    if device.type == "cpu" and scheme_of(params) is not None:
        from gptfn.kernels import route

        return torch.compile(_decode_with_kernels, fullgraph=True, dynamic=None,
                             recompile_limit=_CAPTURES, backend=route.rowmul_eager)
    if not compile:
        return decode_logits
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(decode_logits, fullgraph=True, dynamic=None,
                         recompile_limit=_CAPTURES, mode=mode)


# torch.compile keeps the captures of a function (by code object) for every later call, from
# any generation, and with fullgraph=True fails once it would exceed their limit (torch's
# default, 8). A step is captured for its first shapes; a call of other shapes (batch, cache
# length, another model's sizes) is captured once more with the sizes that changed symbolic
# (dynamic=None: torch's automatic dynamic shapes), which then serves every size. So one
# route's captures are a few per weight format and dtype, whatever the shapes: the limit
# covers all formats at once, with room, however many generations a process runs.
_CAPTURES = 64


# One function per route, so that each route's captures have their own budget rather than
# sharing decode_logits'.
def _decode_with_kernels(*args) -> Tensor:
    return decode_logits(*args)


def _decode_compiled_with_kernels(*args) -> Tensor:
    return decode_logits(*args)


def generate_tokens(
    model: ModelLike,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    compile: bool = False,
    attention_mask: Optional[Tensor] = None,
) -> Iterator[Tensor]:
    """Yield the next token of every row, one step at a time: (B,) int64 tensors.

    Rows that produced ``eos_id`` produce ``eos_id`` from then on; the iterator stops
    early once every row has. Arguments as for ``generate``.
    """
    config, params = model_parts(model)
    check_sampling(temperature, top_k, top_p)
    idx = as_token_rows(idx, "idx")
    if attention_mask is not None:
        attention_mask = as_token_rows(attention_mask, "attention_mask")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if idx.dim() == 2 and idx.size(1) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    check_tokens(idx, config.vocab_size, config.context_length)
    b, t = idx.shape
    if t + max_new_tokens > config.context_length:
        raise ValueError(
            f"prompt length {t} + max_new_tokens {max_new_tokens} = {t + max_new_tokens} "
            f"exceeds context_length {config.context_length} (gptfn does not slide the window)"
        )
    if eos_id is not None and not 0 <= eos_id < config.vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocab [0, {config.vocab_size})")
    if max_new_tokens == 0:
        return
    wte = params["wte.weight"]
    idx = idx.to(wte.device)
    start = _pad_starts(attention_mask, idx)
    decode = decode_function(params, config, compile)
    k = top_k or 0
    p = 1.0 if top_p is None else float(top_p)
    with torch.no_grad():
        cache = KVCache.create(config, b, t + max_new_tokens, dtype=params["wpe.weight"].dtype,
                               device=wte.device)  # the compute dtype (a format keeps wpe)
        if compile and wte.device.type == "cuda":
            # CUDA graphs copy inputs into static buffers at each replay unless told that
            # they keep their address: the weights and the cache (written in place) do.
            for tensor in [*params.values(), *cache.keys, *cache.values]:
                torch._dynamo.mark_static_address(tensor)
        logits, cache = prefill(params, idx, cache, config, start)  # (B, V)
        done = torch.zeros(b, dtype=torch.bool, device=wte.device)
        for step in range(max_new_tokens):
            token = sample_next(logits, float(temperature), k, p, generator)  # (B,)
            if eos_id is not None:
                token = torch.where(done, torch.full_like(token, eos_id), token)
                done = done | (token == eos_id)
            yield token
            if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                return
            input_pos = torch.tensor([t + step], device=wte.device)  # (1,)
            logits = decode(params, token.view(-1, 1), cache.keys, cache.values, input_pos,
                            cache.start, config)  # (B, V)
            if compile:
                logits = logits.clone()  # CUDA graphs reuse their output buffer


def generate(
    model: ModelLike,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    compile: bool = False,
    attention_mask: Optional[Tensor] = None,
) -> Tensor:
    """Extend each row of ``idx`` by ``max_new_tokens`` tokens.

    ``model`` is a GPTModel or a (config, params) pair. ``temperature == 0`` is greedy;
    otherwise tokens are sampled (after ``top_k`` / ``top_p`` filtering) with ``generator``.
    Rows that produce ``eos_id`` are padded with ``eos_id`` after it. For prompts of
    different lengths, left-pad them (``left_pad``) and pass ``attention_mask``; each row
    then gets the tokens it would get alone.

    ``idx`` (and ``attention_mask``) may be a tensor, a list of ids (one row), a list of
    equal-length lists or a numpy array.

    Shapes: idx (B, T) -> (B, T + max_new_tokens).
    """
    idx = as_token_rows(idx, "idx")
    new = list(generate_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id,
                               generator, compile, attention_mask))
    device = new[0].device if new else idx.device
    out = torch.full((idx.size(0), max_new_tokens), eos_id if eos_id is not None else 0,
                     dtype=torch.long, device=device)
    if new:
        out[:, : len(new)] = torch.stack(new, dim=1)  # (B, steps)
    return torch.cat([idx.to(device), out], dim=1)  # (B, T + max_new_tokens)


@dataclass
class StreamPiece:
    """One step of streamed output: each row's new token id and the text it completes
    (possibly "" while a multi-byte character is still incomplete)."""

    ids: List[int]
    texts: List[str]


def stream(
    model: ModelLike,
    idx: Tensor,
    max_new_tokens: int,
    tokenizer=None,
    **kwargs,
) -> Iterator[StreamPiece]:
    """Like ``generate``, but yield each step's tokens and decoded text as they come.

    ``tokenizer`` defaults to GPT-2's BPE. The pieces of a row joined equal the decoding of
    its new tokens. Keyword arguments are those of ``generate``.
    """
    if tokenizer is None:
        from gptfn.tokenizer import BPETokenizer

        tokenizer = BPETokenizer()
    idx = as_token_rows(idx, "idx")
    decoders = [tokenizer.decoder() for _ in range(idx.size(0))]
    for token in generate_tokens(model, idx, max_new_tokens, **kwargs):
        ids = token.tolist()
        yield StreamPiece(ids, [d.push(i) for d, i in zip(decoders, ids)])
    tails = [d.flush() for d in decoders]
    if any(tails):
        yield StreamPiece([], tails)
