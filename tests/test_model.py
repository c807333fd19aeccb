"""GPTModel and gpt_forward: one function, three callers (functional, module, scripted)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

import gptfn
from gptfn import GPTModel, gpt_forward, init_params, param_shapes
from gptfn.scripting import script
from tests.helpers import random_idx, randomize_ln_and_biases, tiny_config

configs = st.builds(
    tiny_config,
    num_heads=st.sampled_from([1, 2, 4, 8]),
    num_layers=st.integers(1, 3),
    qkv_bias=st.booleans(),
)


def test_state_dict_keys_are_canonical(tiny):
    cfg, params = tiny
    model = GPTModel(cfg, params=params)
    assert list(model.state_dict()) == list(param_shapes(cfg))
    assert list(GPTModel(tiny_config(qkv_bias=False)).state_dict()) == list(
        param_shapes(tiny_config(qkv_bias=False))
    )


def test_params_are_used_without_copy(tiny):
    cfg, params = tiny
    model = GPTModel(cfg, params=params)
    assert model.wte.weight.data_ptr() == params["wte.weight"].data_ptr()


def test_head_is_tied_to_wte(tiny):
    cfg, params = tiny
    model = GPTModel(cfg, params=params)
    x = torch.randn(1, 3, cfg.embed_dim)
    logits = gptfn.functional.lm_head(x, params["ln_f.weight"], params["ln_f.bias"],
                                      params["wte.weight"], cfg.layer_norm_eps)
    ln = torch.nn.functional.layer_norm(x, [cfg.embed_dim], params["ln_f.weight"],
                                        params["ln_f.bias"], cfg.layer_norm_eps)
    torch.testing.assert_close(logits, ln @ params["wte.weight"].T)
    assert sum(1 for _ in model.parameters()) == len(params)


def test_original_usage_with_config_dict():
    cfg_dict = {"vocab_size": 97, "embed_dim": 32, "context_length": 16, "num_layers": 2,
                "num_heads": 4, "dropout_rate": 0.1, "qkv_bias": False}
    torch.manual_seed(123)
    a = GPTModel(cfg_dict)
    torch.manual_seed(123)
    b = GPTModel(cfg_dict)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    a.eval()
    logits = a(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert logits.shape == (2, 3, 97)


@given(cfg=configs, seed=st.integers(0, 1000), batch=st.integers(1, 3), length=st.integers(1, 32))
def test_functional_module_functional_call_agree(cfg, seed, batch, length):
    params = randomize_ln_and_biases(init_params(cfg, seed))
    idx = random_idx(cfg, batch, length, seed)
    model = GPTModel(cfg, params=params).eval()
    want = gpt_forward(params, idx, cfg)
    assert want.shape == (batch, length, cfg.vocab_size)
    torch.testing.assert_close(model(idx), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(functional_call(model, params, (idx,)), want, atol=1e-6, rtol=0)


@given(cfg=configs, seed=st.integers(0, 1000), length=st.integers(2, 32), data=st.data())
def test_causality(cfg, seed, length, data):
    params = randomize_ln_and_biases(init_params(cfg, seed))
    idx = random_idx(cfg, 2, length, seed)
    t = data.draw(st.integers(0, length - 2), label="t")
    changed = idx.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1 + seed % 5) % cfg.vocab_size
    a, b = gpt_forward(params, idx, cfg), gpt_forward(params, changed, cfg)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-5, rtol=0)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


@given(cfg=configs, seed=st.integers(0, 1000), batch=st.integers(2, 4), length=st.integers(1, 32))
def test_batch_rows_are_independent(cfg, seed, batch, length):
    params = init_params(cfg, seed)
    idx = random_idx(cfg, batch, length, seed)
    out = gpt_forward(params, idx, cfg)
    for row in range(batch):
        torch.testing.assert_close(out[row:row + 1], gpt_forward(params, idx[row:row + 1], cfg),
                                   atol=1e-5, rtol=0)


@given(cfg=configs, seed=st.integers(0, 1000), length=st.integers(1, 32))
def test_scripted_module_matches_eager(cfg, seed, length):
    params = randomize_ln_and_biases(init_params(cfg, seed))
    model = GPTModel(cfg, params=params).eval()
    idx = random_idx(cfg, 2, length, seed)
    scripted = script(model)
    want = model(idx)
    torch.testing.assert_close(scripted(idx), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(scripted(idx), want, atol=1e-6, rtol=0)  # optimised re-run


def test_scripted_gpt_logits_matches_gpt_forward(tiny):
    cfg, params = tiny
    idx = random_idx(cfg, 2, 9)
    fn = script(gptfn.functional.gpt_logits)
    got = fn(params, idx, cfg.num_layers, cfg.num_heads, cfg.layer_norm_eps, cfg.vocab_size,
             cfg.context_length, 0.0, False)
    torch.testing.assert_close(got, gpt_forward(params, idx, cfg), atol=0, rtol=0)


def test_compiled_module_matches_eager(tiny):
    cfg, params = tiny
    model = GPTModel(cfg, params=params).eval()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error
    for length in (5, 17):
        idx = random_idx(cfg, 2, length)
        with torch.no_grad():
            torch.testing.assert_close(compiled(idx), model(idx), atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    cfg = tiny_config(dropout_rate=0.3)
    model = GPTModel(cfg, seed=0)
    idx = random_idx(cfg, 2, 12)
    model.eval()
    torch.testing.assert_close(model(idx), model(idx), atol=0, rtol=0)
    model.train()
    torch.manual_seed(0)
    a = model(idx)
    torch.manual_seed(1)
    b = model(idx)
    assert not torch.allclose(a, b)
    params = gptfn.modules.params_of(model)
    torch.manual_seed(0)
    torch.testing.assert_close(gpt_forward(params, idx, cfg, training=True), a, atol=1e-6, rtol=0)


def test_every_parameter_gets_a_gradient(tiny):
    cfg, params = tiny
    model = GPTModel(cfg, params={k: v.clone() for k, v in params.items()})
    idx = random_idx(cfg, 2, 10)
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bad, error, match", [
    # ids in a tensor are checked on its device by an assertion (no sync): RuntimeError
    (torch.tensor([[1, 2, 97]]), RuntimeError, r"vocab \[0, 97\)"),
    (torch.tensor([[-1, 2]]), RuntimeError, r"vocab \[0, 97\)"),
    (torch.zeros(1, 33, dtype=torch.long), ValueError, "context_length"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
    (torch.tensor([1, 2, 3]), ValueError, "shape"),
    (torch.tensor([[1.0, 2.0]]), ValueError, "integer"),
])
def test_bad_idx_is_named(tiny, bad, error, match):
    cfg, params = tiny
    model = GPTModel(cfg, params=params).eval()
    with pytest.raises(error, match=match):
        gpt_forward(params, bad, cfg)
    with pytest.raises(error, match=match):
        model(bad)
    # TorchScript drops the assertion (its result is unused); F.embedding then refuses the id
    with pytest.raises((torch.jit.Error, RuntimeError), match=match + "|index out of range"):
        script(model)(bad)
    if error is RuntimeError:  # the id check holds in compiled code, with no graph break
        with pytest.raises(error, match=match):
            torch.compile(model, fullgraph=True)(bad)


def test_bad_params_are_named(tiny):
    cfg, params = tiny
    params = dict(params)
    params["h.0.mlp.c_fc.weight"] = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"h.0.mlp.c_fc.weight: expected shape \[32, 128\], got \[4, 4\]"):
        GPTModel(cfg, params=params)
