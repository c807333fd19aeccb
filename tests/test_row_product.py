"""One-row products under torch.compile: ``row_product``, the slabbed reduction that
inductor compiles for batch-1 decode on the CPU (fp32 and bf16)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gptfn.functional.layers as layers
from gptfn import GPTModel, generate
from gptfn.functional import linear
from tests.helpers import random_idx, tiny_config


@given(n_in=st.integers(1, 300), n_out=st.integers(1, 64), lead=st.sampled_from([(1,), (1, 1)]),
       seed=st.integers(0, 100))
def test_row_product_equals_matmul(n_in, n_out, lead, seed):
    g = torch.Generator().manual_seed(seed)  # n_in not a multiple of 8 takes smaller slabs
    x, w = torch.randn(*lead, n_in, generator=g), torch.randn(n_in, n_out, generator=g)
    torch.testing.assert_close(layers.row_product(x, w), x @ w, atol=1e-5, rtol=1e-5)


def test_bf16_row_product_accumulates_in_fp32():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 3072, generator=g).bfloat16(), torch.randn(3072, 256, generator=g).bfloat16()
    exact = x.double() @ w.double()
    got = layers.row_product(x, w)
    assert got.dtype == torch.bfloat16
    # within the output's own rounding (bf16 has 8 significant bits): no error from the sum
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.25)])
def test_compiled_linear_takes_the_row_path(monkeypatch, dtype, atol):
    calls = []
    real = layers.row_product
    monkeypatch.setattr(layers, "row_product", lambda x, w: calls.append(1) or real(x, w))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 1024, generator=g).to(dtype)
    w, b = torch.randn(1024, 512, generator=g).to(dtype), torch.randn(512, generator=g).to(dtype)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(linear, fullgraph=True)(x, w, b)
    assert calls, "the compiled linear did not take row_product"
    want = x.double() @ w.double() + b.double()
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)


def test_compiled_decode_through_row_products_equals_eager(monkeypatch):
    monkeypatch.setattr(layers, "GEMV_MIN_WEIGHT", 1)  # every product of the tiny model
    cfg = tiny_config(context_length=64, embed_dim=36, num_heads=3)  # 36: slabs of 4 rows
    model = GPTModel(cfg, seed=3).eval()
    idx = random_idx(cfg, 1, 5)
    torch._dynamo.reset()
    assert torch.equal(generate(model, idx, 40, compile=True), generate(model, idx, 40))
