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
    # a tensor: asserted on the device (no sync), the range named
    with pytest.raises(RuntimeError, match=r"targets must be token ids in \[0, 97\)"):
        model(idx, torch.full_like(idx, 97))
    # from the host (a list): the id named too
    with pytest.raises(ValueError, match=r"in \[0, 97\) or -100 \(ignore_index\), got -1"):
        model(idx, torch.full_like(idx, -1).tolist())
    with pytest.raises(ValueError, match="targets must hold integer token ids .* torch.float32"):
        model(idx, idx.float())


def padded_targets(data, n: int, v: int, ignore_index: int, g: torch.Generator) -> torch.Tensor:
    """(n,) targets with some positions set to ``ignore_index``: none, scattered, whole rows
    of a (rows, n // rows) batch right-padded (some rows entirely), or all of them."""
    t = torch.randint(0, v, (n,), generator=g)
    how = data.draw(st.sampled_from(["none", "scattered", "rows", "all"]), label="padding")
    if how == "scattered":
        t[torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))] = ignore_index
    elif how == "rows":
        rows = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]), label="rows")
        width = n // rows
        kept = data.draw(st.lists(st.integers(0, width), min_size=rows, max_size=rows),
                         label="kept")
        for r, k in enumerate(kept):  # row r keeps its first k targets (0: fully padded)
            t[r * width + k:(r + 1) * width] = ignore_index
    elif how == "all":
        t[:] = ignore_index
    return t


@given(n=st.integers(1, 40), c=st.integers(1, 16), v=st.integers(2, 60), seed=st.integers(0, 99),
       chunk=st.sampled_from([1, 7, 64, 1 << 23]), ignore_index=st.sampled_from([-100, 0]),
       data=st.data())
def test_ignore_index_equals_cross_entropy_with_gradients(n, c, v, seed, chunk, ignore_index, data):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, requires_grad=True)
    w = torch.randn(v, c, generator=g, requires_grad=True)
    t = padded_targets(data, n, v, ignore_index, g)
    old = L.CHUNK_ELEMENTS
    L.CHUNK_ELEMENTS = chunk
    try:
        ours = linear_cross_entropy(x, w, t, ignore_index)
        (ours * 3.0).backward()
    finally:
        L.CHUNK_ELEMENTS = old
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    want = F.cross_entropy(x @ w.T, t, ignore_index=ignore_index)  # NaN if all are ignored
    (want * 3.0).backward()
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-4)
    assert not gx[t == ignore_index].any()  # ignored positions get no gradient


def test_every_target_ignored_is_nan_with_zero_gradients_as_cross_entropy():
    x, w = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    t = torch.full((6,), -100)
    loss = linear_cross_entropy(x, w, t)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(x @ w.T, t))
    assert not x.grad.any() and not w.grad.any()
    with torch.no_grad():
        assert torch.isnan(linear_cross_entropy(x, w, t))


def test_model_loss_ignores_padding_eager_and_scripted():
    cfg = tiny_config()
    model = GPTModel(cfg, seed=0)
    idx, targets = random_idx(cfg, 3, 12, seed=1), random_idx(cfg, 3, 12, seed=2)
    targets[0, 7:] = -100  # right-padded row
    targets[2] = -100  # a row that is all padding
    logits = model(idx)
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    ours = model(idx, targets)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    for got, exp in zip(torch.autograd.grad(ours, list(model.parameters())), want_grads):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(script(model)(idx, targets), want, atol=1e-5, rtol=1e-5)
    assert torch.isnan(model(idx, torch.full_like(targets, -100)))
    assert torch.isnan(script(model)(idx, torch.full_like(targets, -100)))


def test_compiled_model_loss_with_padding():
    """The loss path compiles as one graph (the target check, a device sync, is skipped
    while compiling, as check_idx's is)."""
    cfg = tiny_config()
    model = GPTModel(cfg, seed=0).eval()
    idx, targets = random_idx(cfg, 2, 8, seed=1), random_idx(cfg, 2, 8, seed=2)
    targets[1, 3:] = -100
    with torch.no_grad():
        want = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
        got = torch.compile(model, fullgraph=True)(idx, targets)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_training_step_compiles_whole():
    """Forward and loss in one graph (fullgraph=True): the targets' range is asserted on the
    device, not read back to the host (a read is a graph break and a sync per step). The
    compiled step's loss and gradients equal eager's."""
    cfg = tiny_config()
    idx, targets = random_idx(cfg, 2, 9, seed=1), random_idx(cfg, 2, 9, seed=2)
    targets[0, :3] = L.IGNORE_INDEX
    eager, compiled = GPTModel(cfg, seed=0), GPTModel(cfg, seed=0)
    step = torch.compile(compiled, fullgraph=True)
    want, got = eager(idx, targets), step(idx, targets)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
