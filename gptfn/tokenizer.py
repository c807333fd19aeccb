"""GPT-2's byte-pair tokenizer over tiktoken, working with no network.

tiktoken downloads its rank files on first use; gptfn ships GPT-2's (``r50k_base``, MIT,
see ``gptfn/assets/NOTICE.md``), checks its sha256 on every load and builds the encodings
from it:

- ``gpt2`` / ``r50k_base``: the ranks, ``<|endoftext|>`` = 50256, 50257 ids;
- ``p50k_base``: the same ranks plus 24 runs of spaces (n = 2..25 spaces -> id 50257 + n - 2),
  ``<|endoftext|>`` still 50256, 50281 ids.

``BPETokenizer`` also wraps any ``tiktoken.Encoding`` it is given.
"""

from __future__ import annotations

import base64
import codecs
import functools
import hashlib
import numbers
import operator
from pathlib import Path
from typing import (
    AbstractSet, Any, Collection, Dict, Iterable, Iterator, List, Literal, Sequence, Union,
)

import tiktoken

ENDOFTEXT = "<|endoftext|>"
R50K_PATH = Path(__file__).parent / "assets" / "r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
ENCODINGS = ("gpt2", "r50k_base", "p50k_base")

Ids = Union[int, Iterable[int]]  # a sequence of ids, a 1-D tensor or array, or one id
AllowedSpecial = Union[Literal["all"], AbstractSet[str]]
DisallowedSpecial = Union[Literal["all"], Collection[str]]


def load_ranks(path: Union[str, Path] = R50K_PATH,
               expected_sha256: str = R50K_SHA256) -> Dict[bytes, int]:
    """Read a tiktoken rank file (``base64(token) rank`` per line), checking its sha256."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"BPE rank file not found: {path}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise ValueError(
            f"BPE rank file {path} has sha256 {digest}, expected {expected_sha256}: "
            "the file is corrupt or not the GPT-2 ranks"
        )
    ranks: Dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise ValueError(f"BPE rank file {path}, line {lineno}: not 'base64 rank'") from None
    return ranks


def dump_ranks(ranks: Dict[bytes, int]) -> bytes:
    """The tiktoken text format of ``ranks`` (sorted by rank), as bytes."""
    lines = (base64.b64encode(tok) + b" " + str(rank).encode() for tok, rank in
             sorted(ranks.items(), key=lambda item: item[1]))
    return b"".join(line + b"\n" for line in lines)


def p50k_ranks(r50k: Dict[bytes, int]) -> Dict[bytes, int]:
    """r50k_base's ranks plus p50k_base's 24 runs of spaces (2..25 spaces -> 50257..50280)."""
    ranks = dict(r50k)
    for n in range(2, 26):
        ranks[b" " * n] = 50257 + n - 2
    return ranks


@functools.lru_cache(maxsize=None)
def get_encoding(name: str = "gpt2") -> tiktoken.Encoding:
    """The tiktoken Encoding ``gpt2`` (= ``r50k_base``) or ``p50k_base``, built offline."""
    from tiktoken_ext.openai_public import r50k_pat_str

    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; known encodings: {', '.join(ENCODINGS)}")
    ranks = load_ranks()
    if name == "p50k_base":
        return tiktoken.Encoding(
            "p50k_base", pat_str=r50k_pat_str, mergeable_ranks=p50k_ranks(ranks),
            special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50281,
        )
    return tiktoken.Encoding(
        name, pat_str=r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257,
    )


class BPETokenizer:
    """GPT-2's tokenizer: ``BPETokenizer("gpt2")``, ``"r50k_base"``, ``"p50k_base"``, or a
    ``tiktoken.Encoding``.

    ``encode`` allows ``<|endoftext|>`` by default (the GPTModelV1 API's tokenizer did); any other
    special token found in the text raises ValueError unless allowed.
    """

    def __init__(self, name: Union[str, tiktoken.Encoding] = "gpt2"):
        if isinstance(name, tiktoken.Encoding):
            self.encoding = name
        elif isinstance(name, str):
            self.encoding = get_encoding(name)
        else:
            raise ValueError(f"expected an encoding name or a tiktoken.Encoding, got {name!r}")

    @property
    def name(self) -> str:
        return self.encoding.name

    @property
    def eot_token(self) -> int:
        return self.encoding.eot_token

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    def __repr__(self) -> str:
        return f"BPETokenizer({self.name!r}, n_vocab={self.n_vocab})"

    def encode(
        self,
        text: str,
        allowed_special: AllowedSpecial = frozenset({ENDOFTEXT}),
        disallowed_special: DisallowedSpecial = "all",
    ) -> List[int]:
        """Token ids of ``text``."""
        return self.encoding.encode(
            text, allowed_special=allowed_special, disallowed_special=disallowed_special
        )

    def encode_ordinary(self, text: str) -> List[int]:
        """Token ids of ``text``, special-token text encoded as ordinary text."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(
        self,
        texts: Sequence[str],
        num_threads: int = 8,
        allowed_special: AllowedSpecial = frozenset({ENDOFTEXT}),
        disallowed_special: DisallowedSpecial = "all",
    ) -> List[List[int]]:
        """Token ids of each text, encoded in parallel by tiktoken's threaded batch encoder."""
        return self.encoding.encode_batch(
            list(texts), num_threads=num_threads, allowed_special=allowed_special,
            disallowed_special=disallowed_special,
        )

    def decode_bytes(self, ids: Ids) -> bytes:
        """The bytes of ``ids``: a sequence of ints, a 1-D tensor or array, or one id."""
        ids = _id_list(ids)
        try:
            self._check_ids(ids)
            return self.encoding.decode_bytes(ids)
        except TypeError:
            _name_bad_id(ids)  # a float, a nested list ...: raise an error that says so
            raise

    def decode(self, ids: Ids, errors: str = "replace") -> str:
        """Text of ``ids`` (one sequence: a list of ints, a 1-D tensor or array, or one id);
        bytes that are not valid UTF-8 become U+FFFD (``errors="replace"``). For a batch
        (a 2-D tensor, a list of lists) use ``decode_batch``."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_batch(self, rows: Iterable[Ids], errors: str = "replace") -> List[str]:
        """Text of each row of ``rows``: a 2-D tensor or array, or a sequence of id lists
        (rows may differ in length)."""
        if isinstance(rows, (str, bytes)):
            raise TypeError(f"decode_batch takes rows of token ids, got {type(rows).__name__}")
        ndim = getattr(rows, "ndim", None)
        if ndim is not None and hasattr(rows, "tolist"):  # a tensor or an array
            if ndim != 2:
                raise ValueError(
                    f"decode_batch takes rows of ids (2-D), got shape {list(rows.shape)}"
                    + (": use decode for one sequence" if ndim < 2 else "")
                )
            rows = rows.tolist()
        rows = list(rows)
        if any(isinstance(r, numbers.Integral) or getattr(r, "ndim", 1) == 0 for r in rows):
            raise ValueError("decode_batch takes rows of ids, got a flat sequence of ids: "
                             "use decode for one sequence")
        return [self.decode(r, errors) for r in rows]

    def decoder(self, errors: str = "replace") -> "IncrementalDecoder":
        """A decoder for token-by-token output (see ``IncrementalDecoder``)."""
        return IncrementalDecoder(self, errors)

    def _check_ids(self, ids: List[int]) -> None:
        if not ids:
            return
        lo, hi, n = min(ids), max(ids), self.n_vocab
        if lo < 0 or hi >= n:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocab [0, {n})")


def _id_list(ids: Any) -> List[Any]:
    """``ids`` (one sequence of ids: a list, a 1-D tensor or array; or one id, also a 0-d
    tensor or a numpy int) as a list, without importing torch or numpy."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"decode takes token ids, got {type(ids).__name__} (encode turns text "
                        "into ids)")
    if isinstance(ids, numbers.Integral) and not isinstance(ids, bool):
        return [ids]  # one id (int, numpy int)
    ndim = getattr(ids, "ndim", None)
    if ndim is not None and hasattr(ids, "tolist"):  # a tensor or an array
        if ndim > 1:
            raise ValueError(
                f"decode takes one sequence of ids (1-D), got shape {list(ids.shape)}: "
                "decode row by row, or use decode_batch"
            )
        ids = ids.tolist()
        return ids if ndim == 1 else [ids]
    try:
        return list(ids)
    except TypeError:
        raise TypeError(
            f"decode takes token ids (a list of ints, a 1-D tensor or one int), "
            f"got {type(ids).__name__}"
        ) from None


def _name_bad_id(ids: List[Any]) -> None:
    """Raise the error that says what in ``ids`` is not a token id (if anything is)."""
    for pos, i in enumerate(ids):
        if isinstance(i, (list, tuple)) or getattr(i, "ndim", 0) > 0:
            raise ValueError(
                f"decode takes one sequence of ids, got a sequence of sequences (item {pos} "
                f"is a {type(i).__name__}): decode row by row, or use decode_batch"
            )
        try:
            operator.index(i)
        except TypeError:
            raise TypeError(
                f"token ids must be ints, got {type(i).__name__} {i!r:.40} at position {pos}"
            ) from None


class IncrementalDecoder:
    """Decodes ids one at a time and never emits a broken UTF-8 character.

    A token can end in the middle of a multi-byte character; its bytes are held until the
    character is complete. The pieces joined, plus ``flush()``, equal ``decode`` of all ids.
    """

    def __init__(self, tokenizer: BPETokenizer, errors: str = "replace"):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=errors)

    def push(self, ids: Union[int, Iterable[int]]) -> str:
        """Add one id (or several) and return the text that is now complete (maybe "")."""
        return self._utf8.decode(self._tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """The text of any bytes still held (an incomplete character decodes per ``errors``)."""
        return self._utf8.decode(b"", final=True)


def decode_stream(tokenizer: BPETokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Yield the text pieces of ``ids`` as they become complete characters."""
    dec = tokenizer.decoder()
    for i in ids:
        piece = dec.push(i)
        if piece:
            yield piece
    tail = dec.flush()
    if tail:
        yield tail


# The GPTModelV1 API's name, for its users' code (``BPE_Tokenizer("p50k_base")``).
BPE_Tokenizer = BPETokenizer
