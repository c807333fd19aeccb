"""Sampling filters and the next-token choice."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gptfn.functional import sample_next, top_k_filter, top_p_filter
from gptfn.generation import check_sampling
from gptfn.scripting import script

rows = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=1, max_size=40)


@given(row=rows, data=st.data())
def test_top_k_keeps_exactly_the_k_highest(row, data):
    logits = torch.tensor([row])
    k = data.draw(st.integers(1, len(row)), label="k")
    out = top_k_filter(logits, k)
    kept = torch.isfinite(out[0])
    assert int(kept.sum()) == k
    assert torch.equal(out[0][kept], logits[0][kept])  # kept values unchanged
    if k < len(row):  # every kept logit >= every dropped one
        assert logits[0][kept].min() >= logits[0][~kept].max()
    assert torch.equal(logits, torch.tensor([row]))  # input untouched


@given(row=rows, p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_with_mass_p(row, p):
    logits = torch.tensor([row], dtype=torch.float64)
    out = top_p_filter(logits, p)
    kept = torch.isfinite(out[0])
    probs = torch.softmax(logits[0], 0)
    assert kept.any()
    assert torch.equal(out[0][kept], logits[0][kept])
    # the kept set is a top set: no dropped token is more likely than a kept one
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max()
    # its mass reaches p, and without its least likely member it would not
    mass = probs[kept].sum().item()
    assert mass >= p - 1e-9
    assert mass - probs[kept].min().item() < p + 1e-9


def test_greedy_and_temperature_zero():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    assert sample_next(logits).tolist() == [1, 0]
    assert sample_next(logits, temperature=0.0, top_k=2, top_p=0.5).tolist() == [1, 0]


@given(seed=st.integers(0, 2**31 - 1))
def test_top_k_1_equals_greedy(seed):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    assert torch.equal(sample_next(logits, 1.3, top_k=1, generator=gen), logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_uses_the_generator():
    logits = torch.zeros(8, 1000)
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(1))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(1))
    c = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampled_tokens_respect_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist()) <= {3, 4}
    # probabilities of 4, 3, 2, ...: 0.64, 0.24, ... -> top_p=0.5 keeps token 4 alone
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=gen).tolist()) == {4}


@pytest.mark.parametrize("name", ["top_k_filter", "top_p_filter", "sample_next"])
def test_sampling_scripts(name):
    import gptfn.functional as F

    fn = script(getattr(F, name))
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(0))
    if name == "sample_next":
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(fn(logits, 0.8, 5, 0.9, g1), F.sample_next(logits, 0.8, 5, 0.9, g2))
    else:
        arg = 5 if name == "top_k_filter" else 0.7
        assert torch.equal(fn(logits, arg), getattr(F, name)(logits, arg))


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.1, top_k=None, top_p=None), "temperature"),
    (dict(temperature=float("nan"), top_k=None, top_p=None), "temperature"),
    (dict(temperature=1.0, top_k=0, top_p=None), "top_k"),
    (dict(temperature=1.0, top_k=-3, top_p=None), "top_k"),
    (dict(temperature=1.0, top_k=None, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_k=None, top_p=1.5), "top_p"),
])
def test_bad_sampling_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        check_sampling(**kwargs)
