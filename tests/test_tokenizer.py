"""The offline GPT-2 tokenizer: known ids, round trips, incremental decoding, bad input."""

import hashlib
import shutil

import pytest
import tiktoken
from hypothesis import given
from hypothesis import strategies as st

from gptfn import BPETokenizer
from gptfn.tokenizer import (
    R50K_PATH,
    decode_stream,
    dump_ranks,
    get_encoding,
    load_ranks,
    p50k_ranks,
)

gpt2 = BPETokenizer("gpt2")
p50k = BPETokenizer("p50k_base")

# tiktoken's own expected_hash for p50k_base.tiktoken (tiktoken_ext/openai_public.py)
P50K_SHA256 = "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"


@pytest.mark.parametrize("text, ids", [
    ("Hello, world!", [15496, 11, 995, 0]),
    (" The quick brown fox", [383, 2068, 7586, 21831]),
    ("<|endoftext|>", [50256]),
])
def test_known_ids(text, ids):
    assert gpt2.encode(text) == ids
    assert BPETokenizer("r50k_base").encode(text) == ids
    assert gpt2.decode(ids) == text


def test_vocab_and_eot():
    assert (gpt2.n_vocab, gpt2.eot_token) == (50257, 50256)
    assert (p50k.n_vocab, p50k.eot_token) == (50281, 50256)


def test_p50k_runs_of_spaces():
    for n in range(2, 26):
        assert p50k.encode(" " * n) == [50257 + n - 2]
        assert p50k.decode([50257 + n - 2]) == " " * n
    assert p50k.encode("a" + " " * 4 + "b")[1] == 50257 + 3 - 2  # 3 spaces, then " b"
    assert all(i < 50257 for i in gpt2.encode(" " * 20))  # r50k has no runs of spaces


def test_p50k_derivation_is_tiktokens_file():
    """The derived ranks serialize to exactly the file tiktoken would download."""
    data = dump_ranks(p50k_ranks(load_ranks()))
    assert hashlib.sha256(data).hexdigest() == P50K_SHA256


def test_rank_file_roundtrips():
    assert dump_ranks(load_ranks()) == R50K_PATH.read_bytes()


def test_rank_file_with_wrong_sha256(tmp_path):
    bad = tmp_path / "r50k_base.tiktoken"
    shutil.copy(R50K_PATH, bad)
    with open(bad, "ab") as fh:
        fh.write(b"IQ== 50256\n")
    with pytest.raises(ValueError, match="sha256"):
        load_ranks(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_ranks(tmp_path / "missing.tiktoken")


def test_unknown_encoding():
    with pytest.raises(ValueError, match="unknown encoding 'cl100k_base'"):
        BPETokenizer("cl100k_base")


def test_wraps_a_tiktoken_encoding():
    enc = tiktoken.Encoding("tiny", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={"<|endoftext|>": 256})
    tok = BPETokenizer(enc)
    assert tok.encode("ab") == [97, 98] and tok.eot_token == 256 and tok.name == "tiny"


def test_special_tokens_policy():
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    with pytest.raises(ValueError, match="disallowed special token"):
        gpt2.encode("a<|endoftext|>b", allowed_special=set())
    # explicitly treated as text: the literal characters' tokens
    as_text = gpt2.encode("<|endoftext|>", allowed_special=set(), disallowed_special=())
    assert 50256 not in as_text and gpt2.decode(as_text) == "<|endoftext|>"
    assert gpt2.encode_ordinary("<|endoftext|>") == as_text


def test_encode_batch_equals_encode():
    texts = ["Hello, world!", "", " The quick brown fox", "naïve café 日本語 🙂", "<|endoftext|>x"]
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]


def test_decode_rejects_ids_outside_vocab():
    with pytest.raises(ValueError, match="token id 50257 is outside the vocab"):
        gpt2.decode([1, 50257])
    with pytest.raises(ValueError, match="token id -1"):
        gpt2.decode([-1])


def test_encoding_is_cached():
    assert get_encoding("gpt2") is get_encoding("gpt2")


@given(text=st.text(max_size=200))
def test_roundtrip_arbitrary_unicode(text):
    assert gpt2.decode(gpt2.encode(text, disallowed_special=())) == text
    assert p50k.decode(p50k.encode(text, disallowed_special=())) == text


@given(text=st.text(max_size=80), data=st.data())
def test_incremental_decoding_equals_one_shot(text, data):
    ids = gpt2.encode(text, disallowed_special=())
    # also arbitrary id sequences, which can cut characters and hold invalid UTF-8
    ids += data.draw(st.lists(st.integers(0, gpt2.n_vocab - 1), max_size=10), label="extra")
    dec = gpt2.decoder()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=5), label="cuts"))
    pieces, prev = [], 0
    for cut in cuts + [len(ids)]:
        pieces.append(dec.push(ids[prev:cut]))
        prev = cut
    pieces.append(dec.flush())
    assert "".join(pieces) == gpt2.decode(ids)
    assert "".join(decode_stream(gpt2, ids)) == gpt2.decode(ids)


def test_incremental_decoder_holds_partial_characters():
    ids = gpt2.encode("🙂")  # one character, several byte-level tokens
    assert len(ids) > 1
    dec = gpt2.decoder()
    outs = [dec.push(i) for i in ids]
    assert outs[:-1] == [""] * (len(ids) - 1) and outs[-1] == "🙂"
    assert "\ufffd" not in "".join(outs)
