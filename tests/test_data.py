"""Sliding-window datasets: the window formula, shifted targets, views, memmap == in-memory."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gptfn import BPETokenizer, TextDataLoader, TextDataset, TokenFileDataset, train_val_split
from gptfn.data import num_windows
from gptfn.prepare import prepare

tok = BPETokenizer()


@given(n=st.integers(2, 300), context=st.integers(1, 40), stride=st.integers(1, 50))
def test_windows_formula_shift_bounds_stride(n, context, stride):
    ids = list(range(1000, 1000 + n))
    if n < context + 1:
        with pytest.raises(ValueError, match="context_size \\+ 1"):
            TextDataset(ids, context_size=context, stride=stride)
        return
    ds = TextDataset(ids, context_size=context, stride=stride)
    # the GPTModelV1 API's loop, counted independently
    assert len(ds) == len(range(0, n - context, stride)) == num_windows(n, context, stride)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == y.shape == (context,)
        assert x.tolist() == ids[i * stride: i * stride + context]  # stride respected
        assert y.tolist() == ids[i * stride + 1: i * stride + 1 + context]  # shifted by one
        assert i * stride + context < n  # in bounds


def test_windows_are_views_of_one_tensor():
    ds = TextDataset(list(range(100)), context_size=8, stride=4)
    x, y = ds[3]
    assert x.untyped_storage().data_ptr() == ds.tokens.untyped_storage().data_ptr()
    assert y.untyped_storage().data_ptr() == ds.tokens.untyped_storage().data_ptr()


def test_text_dataset_from_text():
    text = "Hello, world! " * 20
    ds = TextDataset(text, tok, context_size=4, stride=4)
    assert ds.tokens.tolist() == tok.encode(text)


@pytest.mark.parametrize("kwargs, match", [
    (dict(context_size=0, stride=1), "context_size"),
    (dict(context_size=-3, stride=1), "context_size"),
    (dict(context_size=4, stride=0), "stride"),
    (dict(context_size=4, stride=-1), "stride"),
])
def test_bad_window_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataset(list(range(100)), **kwargs)


def test_empty_and_short_corpus():
    with pytest.raises(ValueError, match="0 tokens"):
        TextDataset("", tok, context_size=4, stride=1)
    with pytest.raises(ValueError, match="4 tokens: at least context_size \\+ 1 = 5"):
        TextDataset([1, 2, 3, 4], context_size=4, stride=1)
    with pytest.raises(ValueError, match="tokenizer"):
        TextDataset("some text", None, context_size=1, stride=1)


def test_loader_original_signature_and_seeded_shuffle():
    text = " ".join(f"word{i}" for i in range(400))
    kwargs = dict(context_size=8, stride=8, batch_size=4, shuffle=True, drop_last=True, num_workers=0)
    a = [x.tolist() for x, _ in TextDataLoader(text, tok, seed=3, **kwargs).get_dataloader()]
    b = [x.tolist() for x, _ in TextDataLoader(text, tok, seed=3, **kwargs)]
    c = [x.tolist() for x, _ in TextDataLoader(text, tok, seed=4, **kwargs)]
    assert a == b and a != c
    loader = TextDataLoader(text, tok, **{**kwargs, "shuffle": False})
    batches = list(loader)
    assert len(batches) == len(loader) == len(loader.dataset) // 4
    x, y = batches[0]
    assert x.shape == y.shape == (4, 8)
    torch.testing.assert_close(x[0], loader.dataset[0][0])


def test_loader_batch_larger_than_data():
    with pytest.raises(ValueError, match="batch_size 50 is larger"):
        TextDataLoader(list(range(20)), context_size=4, stride=4, batch_size=50)


def test_train_val_split():
    train, val = train_val_split("abcdefghij", 0.9)
    assert (train, val) == ("abcdefghi", "j")
    train, val = train_val_split(list(range(10)), 0.5)
    assert train == [0, 1, 2, 3, 4] and val == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="train_ratio"):
        train_val_split("abc", 1.0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    texts = [" ".join(f"token{i % 97} café" for i in range(1500)), "Second document.\nLine two."]
    for k, t in enumerate(texts):
        (root / f"doc{k}.txt").write_text(t, encoding="utf-8")
    out = root / "prepared"
    prepare([root], out, progress=False, val_fraction=0.1)
    ids = []
    for t in texts:
        ids += tok.encode_ordinary(t) + [tok.eot_token]
    return out, ids


@given(context=st.integers(1, 64), stride=st.integers(1, 64))
def test_memmap_dataset_equals_in_memory(prepared, context, stride):
    out, ids = prepared
    file_ds = TokenFileDataset(out, context, split="all", stride=stride)
    mem_ds = TextDataset(ids, context_size=context, stride=stride)
    assert len(file_ds) == len(mem_ds)
    for i in {0, len(mem_ds) // 2, len(mem_ds) - 1}:
        for a, b in zip(file_ds[i], mem_ds[i]):
            assert a.dtype == torch.long and torch.equal(a, b)


def test_memmap_splits_and_random_offsets(prepared):
    out, ids = prepared
    n = len(ids)
    val_start = n - int(n * 0.1)
    train = TokenFileDataset(out, 16, split="train")
    val = TokenFileDataset(out, 16, split="val")
    assert isinstance(train.tokens, np.memmap)
    assert train.tokens.size == val_start and val.tokens.size == n - val_start
    assert val[0][0].tolist() == ids[val_start:val_start + 16]
    rand = TokenFileDataset(out, 16, num_samples=50, seed=7)
    again = TokenFileDataset(out, 16, num_samples=50, seed=7)
    other = TokenFileDataset(out, 16, num_samples=50, seed=8)
    assert len(rand) == 50
    assert np.array_equal(rand.starts, again.starts) and not np.array_equal(rand.starts, other.starts)
    for i in range(50):
        x, y = rand[i]
        s = int(rand.starts[i])
        assert x.tolist() == ids[s:s + 16] and y.tolist() == ids[s + 1:s + 17]
    with pytest.raises(IndexError):
        rand[50]
    with pytest.raises(ValueError, match="split"):
        TokenFileDataset(out, 16, split="test")


def test_raw_token_file(tmp_path):
    f = tmp_path / "ids.bin"
    np.arange(100, dtype="<u2").tofile(f)
    ds = TokenFileDataset(f, 10)
    assert len(ds) == num_windows(100, 10, 10) and ds[1][1].tolist() == list(range(11, 21))
    with open(f, "ab") as fh:
        fh.write(b"\x01")
    with pytest.raises(ValueError, match="201 bytes: not a whole number of uint16 tokens"):
        TokenFileDataset(f, 10)
    with pytest.raises(FileNotFoundError, match="no token file"):
        TokenFileDataset(tmp_path / "missing", 10)


def test_token_file_too_short(tmp_path):
    f = tmp_path / "ids.bin"
    np.arange(5, dtype="<u2").tofile(f)
    with pytest.raises(ValueError, match="5 tokens"):
        TokenFileDataset(f, 5)
