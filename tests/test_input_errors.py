"""Bad input from a user: accepted where it is unambiguous (lists, numpy arrays), otherwise a
ValueError / TypeError that names the argument, the expected and the actual."""

import numpy as np
import pytest
import torch

from gptfn import BPETokenizer, GPTModel, KVCache, generate, gpt_forward, stream
from gptfn.kv_cache import decode_step, prefill
from gptfn.loss import linear_cross_entropy
from gptfn.scripting import script
from gptfn.train import calc_loss_batch
from tests.helpers import random_idx, tiny_config

tok = BPETokenizer()


@pytest.fixture(scope="module")
def model():
    return GPTModel(tiny_config(), seed=0).eval()


# ------------------------------------------------------------------- idx as lists / arrays

@pytest.mark.parametrize("as_given, rows", [
    (lambda t: t[0].tolist(), 1),  # a flat list is one row
    (lambda t: t.tolist(), 2),
    (lambda t: [tuple(r) for r in t.tolist()], 2),
    (lambda t: list(t), 2),  # a list of (T,) tensors
    (lambda t: t.numpy(), 2),
    (lambda t: t.numpy().astype(np.uint16), 2),  # token files are often uint16
    (lambda t: t[0].numpy().astype(np.int32), 1),
])
def test_idx_as_list_or_array_equals_tensor(model, as_given, rows):
    idx = random_idx(model.config, 2, 6)[:rows]
    given = as_given(idx)
    with torch.no_grad():
        torch.testing.assert_close(model(given), model(idx), atol=0, rtol=0)
    assert torch.equal(generate(model, given, 3), generate(model, idx, 3))
    sample = lambda x: generate(model, x, 3, temperature=1.0,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(given), sample(idx))
    got = [p.ids for p in stream(model, given, 3, tokenizer=tok)]
    want = [p.ids for p in stream(model, idx, 3, tokenizer=tok)]
    assert got == want and len(got[0]) == rows


def test_model_loss_takes_list_targets(model):
    idx = random_idx(model.config, 2, 6)
    targets = random_idx(model.config, 2, 6, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(idx.tolist(), targets.tolist()), model(idx, targets),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("bad, error, match", [
    ([[1, 2, 3], [4, 5]], ValueError, r"idx's rows have different lengths \[3, 2\].*left_pad"),
    ("Hello", TypeError, "idx must be a tensor or a list of ints, got str: encode text first"),
    (b"Hello", TypeError, "got bytes"),
    (7, TypeError, "idx must be a .* tensor, a list of ints or a list of lists, got int"),
    (None, TypeError, "got NoneType"),
    ({"input_ids": [1, 2]}, TypeError, "got dict"),
    ([1, None, 3], TypeError, "idx must hold ints, got an item of type NoneType"),
    ([["a", "b"]], TypeError, "idx must hold ints, got an item of type str"),
    (np.array(["a", "b"]), TypeError, "idx must hold ints, got an array of dtype <U1"),
    ([1.0, 2.0], ValueError, "idx must hold integer token ids .* got torch.float32"),
    (np.array([[1.5, 2.0]]), ValueError, "idx must hold integer token ids .* got torch.float64"),
    ([], ValueError, "empty"),
    ([[1, 2, 97]], ValueError, r"token id 97 is outside the vocab \[0, 97\)"),
    ([[[1, 2]]], ValueError, r"idx must have shape \(batch, seq_len\), got \[1, 1, 2\]"),
])
def test_bad_idx_is_named_by_model_and_generate(model, bad, error, match):
    with pytest.raises(error, match=match):
        model(bad)
    with pytest.raises(error, match=match):
        generate(model, bad, 2)
    with pytest.raises(error, match=match):
        next(iter(stream(model, bad, 2, tokenizer=tok)))


def test_tensors_keep_their_checks(model):
    """A 1-D tensor stays an error (a flat *list* is one row; a tensor's shape is meant)."""
    for bad, match in [(torch.tensor([1, 2, 3]), r"shape \(batch, seq_len\), got \[3\]"),
                       (torch.tensor([[1.0, 2.0]]), "integer token ids .* got torch.float32")]:
        with pytest.raises(ValueError, match=match):
            generate(model, bad, 2)


def test_functional_entry_points_name_a_list(model):
    cfg, params = model.config, dict(model.state_dict())
    with pytest.raises(TypeError, match="idx must be a torch.Tensor of token ids, got list"):
        gpt_forward(params, [[1, 2]], cfg)
    with pytest.raises(TypeError, match="idx must be a torch.Tensor of token ids, got list"):
        prefill(params, [[1, 2]], KVCache.create(cfg, 1, 4), cfg)
    with pytest.raises(TypeError, match="token must be a torch.Tensor of token ids, got list"):
        decode_step(params, [1], KVCache.create(cfg, 1, 4), torch.tensor([0]), cfg)


def test_scripted_model_names_the_type(model):
    """The scripted forward takes tensors only (test_model checks that scripting and
    torch.compile(fullgraph=True) still match eager); TorchScript names the type."""
    with pytest.raises(RuntimeError, match="Expected a value of type 'Tensor' for argument 'idx' "
                                           "but instead found type 'list'"):
        script(model)([[1, 2]])


# --------------------------------------------------------------------------- attention_mask

@pytest.mark.parametrize("mask, error, match", [
    (torch.tensor([[0.5, 1, 1, 1], [1, 1, 1, 1]]), ValueError,
     r"attention_mask must hold only 0 \(padding\) and 1 \(tokens\), got 0.5"),
    (torch.tensor([[1, 1, 1, 1], [0, 0, 2, 1]]), ValueError, "must hold only 0 .* got 2"),
    (torch.tensor([[1, 1, 1, 1], [-1, 1, 1, 1]]), ValueError, "must hold only 0 .* got -1"),
    (torch.tensor([[float("nan"), 1, 1, 1], [1, 1, 1, 1]]), ValueError, "got nan"),
    (torch.ones(2, 3), ValueError,
     r"attention_mask must have the shape of idx \[2, 4\], got \[2, 3\]"),
    (torch.ones(4), ValueError, r"attention_mask must have the shape of idx \[2, 4\], got \[4\]"),
    ([[1, 1, 1, 1], [1, 1]], ValueError, "attention_mask's rows have different lengths"),
    ("1111", TypeError, "attention_mask must be a tensor or a list of ints, got str"),
])
def test_bad_attention_mask_is_named(model, mask, error, match):
    idx = random_idx(model.config, 2, 4)
    with pytest.raises(error, match=match):
        generate(model, idx, 2, attention_mask=mask)
    with pytest.raises(error, match=match):
        next(iter(stream(model, idx, 2, tokenizer=tok, attention_mask=mask)))


def test_binary_masks_of_any_dtype_or_a_list_are_accepted(model):
    idx = random_idx(model.config, 2, 4)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    want = generate(model, idx, 3, attention_mask=mask)
    for given in (mask.float(), mask.bool(), mask.tolist(), mask.numpy()):
        assert torch.equal(generate(model, idx, 3, attention_mask=given), want)


# --------------------------------------------------------------------------------- targets

def test_bad_targets_are_named(model):
    idx = random_idx(model.config, 2, 5)
    scripted = script(model)
    for bad in (idx.float(), idx.double()):
        named = f"targets must hold integer token ids .* got {bad.dtype}"
        with pytest.raises(ValueError, match=named):
            model(idx, bad)
        with pytest.raises(torch.jit.Error, match="targets must hold integer token ids"):
            scripted(idx, bad)
        with pytest.raises(ValueError, match=named):
            linear_cross_entropy(torch.randn(10, 32), model.wte.weight, bad.flatten())
    for value in (-5, -1, 97, 1000):
        bad = idx.clone()
        bad[1, 2] = value
        named = rf"targets must be token ids in \[0, 97\) or -100 \(ignore_index\), got {value}"
        # where data enters (a list from the host, the training loop's batch) the id is named
        with pytest.raises(ValueError, match=named):
            model(idx, bad.tolist())
        with pytest.raises(ValueError, match=named):
            calc_loss_batch(idx, bad, model, "cpu")
        # a tensor reaching the loss: asserted on the device, without a read back
        with pytest.raises(RuntimeError, match=r"targets must be token ids in \[0, 97\) or -100"):
            model(idx, bad)
    with pytest.raises(TypeError, match="targets must be a tensor or a list of ints, got str"):
        model(idx, "targets")


# -------------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("rows", [
    torch.tensor([[15496, 11], [995, 0]]),
    np.array([[15496, 11], [995, 0]]),
    [[15496, 11], [995, 0]],
])
def test_decode_of_a_batch_names_the_shape_and_decode_batch_decodes_it(rows):
    match = (r"decode takes one sequence of ids \(1-D\), got shape \[2, 2\].*decode_batch"
             if hasattr(rows, "shape") else "decode takes one sequence of ids.*decode_batch")
    with pytest.raises(ValueError, match=match):
        tok.decode(rows)
    assert tok.decode_batch(rows) == ["Hello,", " world!"]


def test_decode_batch_takes_ragged_rows_and_rejects_one_sequence():
    assert tok.decode_batch([[15496, 11, 995], [0], []]) == ["Hello, world", "!", ""]
    assert tok.decode_batch([torch.tensor([15496]), np.array([11])]) == ["Hello", ","]
    for flat in ([15496, 11], torch.tensor([15496, 11])):
        with pytest.raises(ValueError, match="use decode for one sequence"):
            tok.decode_batch(flat)
    with pytest.raises(ValueError,
                       match=r"decode_batch takes rows of ids \(2-D\), got shape \[1, 1, 2\]"):
        tok.decode_batch(torch.zeros(1, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocab"):
        tok.decode_batch([[1], [50257]])


def test_decode_of_one_id_in_any_form():
    for one in (15496, np.int64(15496), torch.tensor(15496), np.array(15496)):
        assert tok.decode(one) == "Hello"
    dec = tok.decoder()
    assert dec.push(torch.tensor(15496)) + dec.push(torch.tensor([11])) == "Hello,"


@pytest.mark.parametrize("bad, error, match", [
    ([15496, 1.5], TypeError, "token ids must be ints, got float 1.5 at position 1"),
    (torch.tensor([1.0, 2.0]), TypeError, "token ids must be ints, got float 1.0 at position 0"),
    ("Hello", TypeError, r"decode takes token ids, got str \(encode turns text into ids\)"),
    (None, TypeError, "decode takes token ids .* got NoneType"),
    ([[1, 2], 3], ValueError, "got a sequence of sequences"),
])
def test_bad_ids_for_decode_are_named(bad, error, match):
    with pytest.raises(error, match=match):
        tok.decode(bad)
