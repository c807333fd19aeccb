import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gptfn import GPTConfig, init_params, num_params, param_shapes, validate_params
from tests.helpers import tiny_config


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_param_count_matches_hf(preset):
    transformers = pytest.importorskip("transformers")
    cfg = GPTConfig.from_preset(preset)
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_hf_dict()))
    # HF counts the tied head once, and holds no other parameters
    assert num_params(cfg) == sum(p.numel() for p in hf.parameters())


def test_gpt2_124m_count():
    assert num_params(GPTConfig.from_preset("gpt2")) == 124_439_808


def test_shapes_are_checkpoint_layout():
    cfg = tiny_config(embed_dim=16, num_heads=2, vocab_size=50, context_length=8)
    shapes = param_shapes(cfg)
    assert shapes["wte.weight"] == (50, 16)
    assert shapes["wpe.weight"] == (8, 16)
    assert shapes["h.1.attn.c_attn.weight"] == (16, 48)  # [in, out]
    assert shapes["h.1.mlp.c_fc.weight"] == (16, 64)
    assert shapes["h.1.mlp.c_proj.weight"] == (64, 16)
    assert "lm_head.weight" not in shapes
    assert "h.0.attn.c_attn.bias" not in param_shapes(tiny_config(qkv_bias=False))


def test_init_statistics():
    cfg = GPTConfig(vocab_size=2000, context_length=256, embed_dim=128, num_layers=6, num_heads=4)
    p = init_params(cfg, seed=0)
    assert set(p) == set(param_shapes(cfg))
    for key, t in p.items():
        assert t.dtype == torch.float32
        if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert torch.all(t == 1), key
        elif key.endswith(".bias"):
            assert torch.all(t == 0), key
        else:
            std = 0.02 / math.sqrt(2 * cfg.num_layers) if key.endswith("c_proj.weight") else 0.02
            assert t.std().item() == pytest.approx(std, rel=0.05), key
            assert abs(t.mean().item()) < 3 * std / math.sqrt(t.numel()) + 1e-6, key


@given(seed=st.integers(0, 2**32 - 1))
def test_init_is_a_function_of_the_seed(seed):
    cfg = tiny_config()
    a, b, c = init_params(cfg, seed), init_params(cfg, seed), init_params(cfg, seed + 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wte.weight"], c["wte.weight"])


def test_init_dtype():
    p = init_params(tiny_config(), dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in p.values())
    with pytest.raises(ValueError, match="dtype"):
        init_params(tiny_config(), dtype=torch.int64)


def test_validate_names_missing_unexpected_and_shapes():
    cfg = tiny_config()
    p = init_params(cfg)
    del p["h.1.ln_2.bias"]
    p["h.0.attn.c_attn.weight"] = torch.zeros(32, 95)
    p["h.7.extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        validate_params(p, cfg)
    msg = str(e.value)
    assert "missing keys: h.1.ln_2.bias" in msg
    assert "unexpected keys: h.7.extra" in msg
    assert "h.0.attn.c_attn.weight: expected shape [32, 96], got [32, 95]" in msg


def test_validate_rejects_integer_and_mixed_dtypes():
    cfg = tiny_config()
    p = init_params(cfg)
    p["ln_f.bias"] = p["ln_f.bias"].long()
    with pytest.raises(ValueError, match="ln_f.bias: expected a floating-point"):
        validate_params(p, cfg)
    p = init_params(cfg)
    p["ln_f.bias"] = p["ln_f.bias"].double()
    with pytest.raises(ValueError, match="mixed dtypes"):
        validate_params(p, cfg)
