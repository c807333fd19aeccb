"""The one-row OpenBLAS product gptfn::gemv, and when the functional core uses it."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gptfn.cpu_gemv as cpu_gemv
from gptfn import GPTModel
from gptfn.functional import linear, lm_head
from gptfn.functional.layers import one_cpu_row
from gptfn.scripting import script
from tests.helpers import random_idx, tiny_config

pytestmark = pytest.mark.skipif(not cpu_gemv.available(),
                                reason="numpy's BLAS is not OpenBLAS: gptfn::gemv is not registered")


@given(n_in=st.integers(1, 300), n_out=st.integers(1, 300), seed=st.integers(0, 100))
def test_gemv_equals_matmul(n_in, n_out, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(1, n_in, generator=g), torch.randn(n_in, n_out, generator=g)
    torch.testing.assert_close(torch.ops.gptfn.gemv(x, w, False), x @ w, atol=1e-5, rtol=1e-5)
    wt = w.t().contiguous()
    torch.testing.assert_close(torch.ops.gptfn.gemv(x, wt, True), x @ w, atol=1e-5, rtol=1e-5)


def test_openblas_threads_are_restored():
    blas = cpu_gemv._openblas()
    before = blas.num_threads
    torch.ops.gptfn.gemv(torch.randn(1, 64), torch.randn(64, 64), False)
    assert blas.num_threads == before


def test_when_the_core_uses_it():
    from gptfn.functional.layers import GEMV_MIN_WEIGHT

    w = torch.randn(1024, GEMV_MIN_WEIGHT // 1024)
    assert one_cpu_row(torch.randn(1, 1, 1024), w)
    assert not one_cpu_row(torch.randn(2, 1, 1024), w)  # two rows: BLAS gemm via torch
    assert not one_cpu_row(torch.randn(1, 16), torch.randn(16, 8))  # too small to gain
    assert not one_cpu_row(torch.randn(1, 1024, dtype=torch.float64), w.double())
    assert not one_cpu_row(torch.randn(1, 1024), w.t().contiguous().t())  # not contiguous
    assert not one_cpu_row(torch.randn(1, 1024, requires_grad=True), w)  # gradient needed
    with torch.no_grad():
        assert one_cpu_row(torch.randn(1, 1024, requires_grad=True), w)


def test_linear_and_head_agree_with_torch_and_keep_gradients():
    x, w, b = torch.randn(1, 1, 512), torch.randn(512, 1024), torch.randn(1024)
    assert one_cpu_row(x, w)
    torch.testing.assert_close(linear(x, w, b), torch.addmm(b, x[0], w)[None], atol=1e-4, rtol=1e-5)
    wte, lw, lb = torch.randn(1024, 512), torch.randn(512), torch.randn(512)
    ln = torch.nn.functional.layer_norm(x, [512], lw, lb, 1e-5)
    torch.testing.assert_close(lm_head(x, lw, lb, wte, 1e-5), ln @ wte.T, atol=1e-4, rtol=1e-5)
    wg = w.clone().requires_grad_()
    linear(x, wg, b).sum().backward()  # the torch path, so autograd works
    assert wg.grad is not None


def test_one_token_forward_matches_scripted_model():
    """Eager (gemv for one row) and TorchScript (never gemv) give the same logits."""
    cfg = tiny_config(embed_dim=256, num_heads=4, vocab_size=4096)  # weights large enough
    model = GPTModel(cfg, seed=0).eval()
    idx = random_idx(cfg, 1, 1)
    with torch.no_grad():
        assert one_cpu_row(torch.randn(1, 1, 256), model.wte.weight)
        torch.testing.assert_close(model(idx), script(model)(idx), atol=1e-5, rtol=1e-5)
    assert "gptfn::gemv" not in str(script(model).graph)
