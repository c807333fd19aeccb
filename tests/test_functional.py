"""The pure core: written-out formulas against torch's fused ops, and TorchScript."""

import math

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given
from hypothesis import strategies as st

from gptfn import functional as F
from gptfn.scripting import script

seeds = st.integers(0, 2**31 - 1)


def randn(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@given(seed=seeds, n=st.integers(1, 64), scale=st.sampled_from([0.1, 1.0, 5.0]))
def test_gelu_written_out_equals_fused(seed, n, scale):
    x = randn(3, n, seed=seed, scale=scale)
    torch.testing.assert_close(F.gelu(x), TF.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-5)


def test_gelu_known_values():
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) evaluated by hand in float64
    for x in (-3.0, -1.0, 0.0, 0.5, 2.0):
        want = 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        assert F.gelu(torch.tensor([x], dtype=torch.float64)).item() == pytest.approx(want)


@given(seed=seeds, c=st.integers(2, 96), eps=st.sampled_from([1e-5, 1e-3]))
def test_layer_norm_written_out_equals_fused(seed, c, eps):
    x = randn(2, 5, c, seed=seed, scale=3.0) + 1.0
    w, b = randn(c, seed=seed + 1), randn(c, seed=seed + 2)
    torch.testing.assert_close(
        F.layer_norm(x, w, b, eps), TF.layer_norm(x, [c], w, b, eps), atol=1e-5, rtol=1e-5
    )


@given(seed=seeds, n_in=st.integers(1, 40), n_out=st.integers(1, 40), bias=st.booleans(),
       lead=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_linear_is_x_at_w_plus_b(seed, n_in, n_out, bias, lead):
    x, w = randn(*lead, n_in, seed=seed), randn(n_in, n_out, seed=seed + 1)
    b = randn(n_out, seed=seed + 2) if bias else None
    want = x @ w + (b if b is not None else 0)
    torch.testing.assert_close(F.linear(x, w, b), want, atol=1e-5, rtol=1e-5)


def test_feed_forward_expands_and_projects():
    c = 8
    x = randn(2, 3, c)
    wf, bf, wp, bp = randn(c, 4 * c, seed=1), randn(4 * c, seed=2), randn(4 * c, c, seed=3), randn(c, seed=4)
    want = F.gelu(x @ wf + bf) @ wp + bp
    torch.testing.assert_close(F.feed_forward(x, wf, bf, wp, bp), want, atol=1e-5, rtol=1e-5)


def _qkv(d_in, d_out, seed, bias):
    ws = [randn(d_in, d_out, seed=seed + i, scale=0.3) for i in range(3)]
    bs = [randn(d_out, seed=seed + 10 + i) if bias else None for i in range(3)]
    return ws, bs


@given(seed=seeds, t=st.integers(1, 12), bias=st.booleans())
def test_self_attention_by_hand(seed, t, bias):
    x = randn(2, t, 6, seed=seed)
    (wq, wk, wv), (bq, bk, bv) = _qkv(6, 4, seed, bias)
    q, k, v = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
    # each row's weights from an explicit loop over query and key positions
    out = torch.zeros(2, t, 4)
    for bi in range(2):
        for i in range(t):
            scores = torch.stack([q[bi, i] @ k[bi, j] for j in range(t)]) / math.sqrt(4)
            out[bi, i] = torch.softmax(scores, 0) @ v[bi]
    torch.testing.assert_close(F.self_attention(x, wq, wk, wv, bq, bk, bv), out, atol=1e-5, rtol=1e-5)
    # the unbatched form (the GPTModelV1 API's (T, d_in) input) agrees with row 0
    torch.testing.assert_close(F.self_attention(x[0], wq, wk, wv, bq, bk, bv), out[0],
                               atol=1e-5, rtol=1e-5)


@given(seed=seeds, t=st.integers(1, 12), bias=st.booleans())
def test_causal_attention_equals_sdpa(seed, t, bias):
    x = randn(3, t, 6, seed=seed)
    (wq, wk, wv), (bq, bk, bv) = _qkv(6, 4, seed, bias)
    q, k, v = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
    want = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = F.causal_attention(x, wq, wk, wv, bq, bk, bv)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_causal_attention_dropout_only_in_training():
    x = randn(2, 10, 6)
    (wq, wk, wv), (bq, bk, bv) = _qkv(6, 4, 0, False)
    eval_out = F.causal_attention(x, wq, wk, wv, dropout_p=0.5, training=False)
    torch.testing.assert_close(eval_out, F.causal_attention(x, wq, wk, wv))
    torch.manual_seed(0)
    train_out = F.causal_attention(x, wq, wk, wv, dropout_p=0.5, training=True)
    assert not torch.allclose(train_out, eval_out)


@given(seed=seeds, t=st.integers(1, 12), heads=st.sampled_from([1, 2, 4]), bias=st.booleans())
def test_multi_head_equals_heads_of_causal_attention(seed, t, heads, bias):
    """The fused SDPA path equals the written-out single-head attention run per head."""
    c = 8
    hs = c // heads
    x = randn(2, t, c, seed=seed)
    w_attn = randn(c, 3 * c, seed=seed + 1, scale=0.3)
    b_attn = randn(3 * c, seed=seed + 2) if bias else None
    w_proj, b_proj = randn(c, c, seed=seed + 3), randn(c, seed=seed + 4)
    outs = []
    for h in range(heads):
        cols = [slice(part * c + h * hs, part * c + (h + 1) * hs) for part in range(3)]
        ws = [w_attn[:, s] for s in cols]
        bs = [b_attn[s] if b_attn is not None else None for s in cols]
        outs.append(F.causal_attention(x, ws[0], ws[1], ws[2], bs[0], bs[1], bs[2]))
    want = torch.cat(outs, dim=-1) @ w_proj + b_proj
    got = F.multi_head_attention(x, w_attn, b_attn, w_proj, b_proj, heads)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_split_merge_heads_roundtrip():
    x = randn(2, 5, 12)
    assert F.split_heads(x, 3).shape == (2, 3, 5, 4)
    torch.testing.assert_close(F.merge_heads(F.split_heads(x, 3)), x)


SCRIPTABLE = [
    "gelu", "layer_norm", "linear", "feed_forward", "dropout", "self_attention",
    "single_head_attention", "causal_attention", "split_heads", "merge_heads", "multi_head_attention", "check_idx",
    "embed", "transformer_block", "lm_head", "block_forward", "gpt_logits",
]


@pytest.mark.parametrize("name", SCRIPTABLE)
def test_every_core_function_scripts(name):
    scripted = script(getattr(F, name))
    assert isinstance(scripted, torch.jit.ScriptFunction)


def test_scripted_attention_matches_eager():
    x = randn(2, 7, 8)
    w_attn, w_proj, b_proj = randn(8, 24, seed=1), randn(8, 8, seed=2), randn(8, seed=3)
    want = F.multi_head_attention(x, w_attn, None, w_proj, b_proj, 2)
    got = script(F.multi_head_attention)(x, w_attn, None, w_proj, b_proj, 2, 0.0, False)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_scripting_does_not_warn(recwarn):
    script(F.gelu)
    assert not [w for w in recwarn if "torch.jit.script" in str(w.message)]
