"""The fused head + cross-entropy against F.cross_entropy: value and gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import gptfn.loss as L
from gptfn import GPTModel
from gptfn.loss import linear_cross_entropy
from gptfn.scripting import script
from tests.helpers import random_idx, tiny_config


@given(n=st.integers(1, 40), c=st.integers(1, 16), v=st.integers(2, 60), seed=st.integers(0, 99),
       chunk=st.sampled_from([1, 7, 64, 1 << 23]))
def test_equals_cross_entropy_with_gradients(n, c, v, seed, chunk):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, requires_grad=True)
    w = torch.randn(v, c, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    old = L.CHUNK_ELEMENTS
    L.CHUNK_ELEMENTS = chunk  # rows per chunk = chunk // v, at least 1
    try:
        ours = linear_cross_entropy(x, w, t)
        (ours * 3.0).backward()
    finally:
        L.CHUNK_ELEMENTS = old
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    want = F.cross_entropy(x @ w.T, t)
    (want * 3.0).backward()
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-4)


def test_no_gradient_work_without_grad():
    x, w, t = torch.randn(5, 4), torch.randn(9, 4), torch.randint(0, 9, (5,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t), F.cross_entropy(x @ w.T, t))


def test_model_loss_matches_logits_and_scripted():
    cfg = tiny_config()
    model = GPTModel(cfg, seed=0).eval()
    idx, targets = random_idx(cfg, 3, 12, seed=1), random_idx(cfg, 3, 12, seed=2)
    want = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model(idx, targets), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(script(model)(idx, targets), want, atol=1e-5, rtol=1e-5)


def test_bad_targets():
    cfg = tiny_config()
    model = GPTModel(cfg, seed=0)
    idx = random_idx(cfg, 2, 5)
    with pytest.raises(ValueError, match="targets must have the shape of idx"):
        model(idx, idx[:, :3])
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 97\)"):
        model(idx, torch.full_like(idx, 97))
