"""GPT-2's tokenizer in the form llama.cpp reads from a GGUF file, derived from gptfn's ranks.

llama.cpp's ``gpt2`` tokenizer (the same pre-split regex as tiktoken's ``r50k_base``) wants
what HF's ``vocab.json`` and ``merges.txt`` hold: each token as a string of GPT-2's
byte-to-unicode characters, and the merges in priority order. gptfn ships tiktoken's rank
file instead (``gptfn/assets``), so both are derived from it:

- a token of rank ``r >= 256`` was made by GPT-2's merge number ``r - 256``; which pair it
  merged is what byte-pair encoding of the token's own bytes gives when only merges of rank
  below ``r`` may apply (two pieces are left: the pair);
- the merges are listed in rank order, so llama.cpp's "lowest merge index first" is
  tiktoken's "lowest rank first", and both tokenize alike.

A model whose vocabulary is not GPT-2's 50257 gets the first ``vocab_size`` tokens (and the
merges among them) or, when larger, padding tokens ``[PAD{id}]`` of type unused.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Tuple

ENDOFTEXT_ID = 50256
# gguf's TokenType values (gguf.constants.TokenType), spelled here so that this module
# needs no optional package
NORMAL, CONTROL, UNUSED = 1, 3, 5
NO_MERGE = "\u9f8d \u9f8d"  # outside byte_to_unicode()'s 256 characters


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters: printable
    Latin-1 bytes map to themselves, the others to code points from 256 upwards in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def token_text(token: bytes) -> str:
    """A token's bytes in GPT-2's byte-to-unicode spelling (``b" the"`` -> ``"Ġthe"``)."""
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def merge_of(token: bytes, rank: int, ranks: Dict[bytes, int]) -> Tuple[bytes, bytes]:
    """The pair whose merge made ``token`` (of rank ``rank``): byte-pair encoding of its bytes
    with only the merges of lower rank."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) is not one merge of two lower-ranked "
                         "tokens: these are not byte-pair-encoding ranks")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def _gpt2_vocab() -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    from gptfn.tokenizer import load_ranks

    ranks = load_ranks()
    by_rank = sorted(ranks, key=ranks.__getitem__)
    if [ranks[t] for t in by_rank] != list(range(len(by_rank))) or any(
            len(t) != 1 for t in by_rank[:256]):
        raise ValueError("the rank file is not GPT-2's: ranks 0..255 must be the single bytes")
    tokens = tuple(token_text(t) for t in by_rank)
    merges = tuple(" ".join(token_text(p) for p in merge_of(t, r, ranks))
                   for r, t in enumerate(by_rank) if r >= 256)
    return tokens, merges


def gguf_vocab(vocab_size: int) -> Tuple[List[str], List[str], List[int]]:
    """(tokens, merges, token types) for a model of ``vocab_size`` ids: GPT-2's byte-level
    BPE vocabulary and ``<|endoftext|>`` (control), cut or padded to ``vocab_size``."""
    tokens, merges = _gpt2_vocab()
    tokens = list(tokens[:vocab_size])
    types = [NORMAL] * len(tokens)
    if vocab_size > ENDOFTEXT_ID:
        tokens.append("<|endoftext|>")
        types.append(CONTROL)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
    kept = [m for r, m in enumerate(merges, start=256) if r < min(vocab_size, ENDOFTEXT_ID)]
    # llama.cpp refuses a BPE vocabulary without the merges key, and gguf writes no empty
    # array: a vocabulary of single bytes gets one merge of two characters that GPT-2's
    # byte-to-unicode alphabet never produces, so it never applies
    return tokens, kept or [NO_MERGE], types
