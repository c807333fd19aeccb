"""The standalone layers: each scripts, holds its parameters and calls the functional core."""

import pytest
import torch

from gptfn import (
    GELU,
    CausalAttention,
    FeedForward,
    LayerNorm,
    MultiHeadAttention,
    SelfAttention,
    TransformerBlock,
)
from gptfn import functional as F
from gptfn.scripting import script
from tests.helpers import tiny_config


def x_of(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def test_gelu_and_layer_norm_modules():
    x = x_of(2, 5, 16)
    ln = LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, [16], ln.weight, ln.bias),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(GELU()(x), torch.nn.functional.gelu(x, approximate="tanh"),
                               atol=1e-6, rtol=1e-5)
    assert list(ln.state_dict()) == ["weight", "bias"]


def test_attention_modules_match_functional_and_keep_original_signatures():
    torch.manual_seed(0)
    x = x_of(2, 6, 8)
    sa = SelfAttention(8, 4)
    assert sa.W_query.bias is None and sa.W_query.weight.shape == (8, 4)  # [in, out]
    torch.testing.assert_close(
        sa(x), F.self_attention(x, sa.W_query.weight, sa.W_key.weight, sa.W_value.weight))
    ca = CausalAttention(8, 4, context_length=6, dropout=0.0, qkv_bias=True)
    assert ca.W_key.bias is not None
    want = F.causal_attention(x, ca.W_query.weight, ca.W_key.weight, ca.W_value.weight,
                              ca.W_query.bias, ca.W_key.bias, ca.W_value.bias)
    torch.testing.assert_close(ca(x), want)
    mha = MultiHeadAttention(8, 8, context_length=6, dropout=0.0, num_heads=2)
    assert sorted(mha.state_dict()) == ["c_attn.weight", "c_proj.bias", "c_proj.weight"]
    want = F.multi_head_attention(x, mha.c_attn.weight, None, mha.c_proj.weight, mha.c_proj.bias, 2)
    torch.testing.assert_close(mha(x), want)


def test_feed_forward_and_block_keys():
    ff = FeedForward(8)
    assert [k for k in ff.state_dict()] == ["c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"]
    block = TransformerBlock(tiny_config())
    assert list(block.state_dict())[:3] == ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight"]


@pytest.mark.parametrize("make, shape", [
    (lambda: GELU(), (2, 3, 8)),
    (lambda: LayerNorm(8), (2, 3, 8)),
    (lambda: FeedForward(8), (2, 3, 8)),
    (lambda: SelfAttention(8, 4, qkv_bias=True), (2, 3, 8)),
    (lambda: CausalAttention(8, 4, 6, 0.0), (2, 3, 8)),
    (lambda: MultiHeadAttention(8, 8, 6, 0.0, 2), (2, 3, 8)),
    (lambda: TransformerBlock(tiny_config(embed_dim=8, num_heads=2)), (2, 3, 8)),
])
def test_every_module_scripts_and_matches(make, shape):
    torch.manual_seed(0)
    module = make().eval()
    x = x_of(*shape)
    torch.testing.assert_close(script(module)(x), module(x), atol=1e-6, rtol=0)


def test_attention_modules_reject_too_long_input():
    with pytest.raises(ValueError, match="context_length 4"):
        CausalAttention(8, 4, context_length=4, dropout=0.0)(x_of(1, 5, 8))
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadAttention(8, 9, 4, 0.0, num_heads=2)


# the snippet's num_workers=4, on a 2-core machine: torch's advice, not a failure
@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_the_original_designs_usage_runs_as_written():
    """The GPTModelV1 API's README, with only its import line changed: its class names
    (``GPTModelV1``, ``BPE_Tokenizer``, ``get_dataLoader``) are aliases of gptfn's, and its
    config dict's spellings are read as they are."""
    import inspect

    import gptfn.data
    from gptfn import BPE_Tokenizer, GPTModelV1, TextDataLoader

    text_data = inspect.getsource(gptfn.data) * 6  # about 18,000 p50k tokens
    gpt_config = {"vocab_size": 50281, "context_length": 1024, "emb_dim": 64, "n_heads": 4,
                  "n_layers": 2, "drop_rate": 0.1, "qkv_bias": False}

    model = GPTModelV1(gpt_config)
    tokenizer = BPE_Tokenizer("p50k_base")
    train_loader = TextDataLoader(text_data=text_data, tokenizer=tokenizer, context_size=1024,
                                  stride=512, batch_size=32, shuffle=True, drop_last=True,
                                  num_workers=4).get_dataLoader()

    x, y = next(iter(train_loader))
    assert x.shape == y.shape == (32, 1024) and torch.equal(x[:, 1:], y[:, :-1])
    assert tokenizer.n_vocab == 50281 and tokenizer.decode(tokenizer.encode("  a")) == "  a"
    assert model.config.embed_dim == 64 and model.config.dropout_rate == 0.1
    assert not model.config.qkv_bias
    loss = model(x[:2, :64], y[:2, :64])
    assert loss.shape == () and torch.isfinite(loss)
