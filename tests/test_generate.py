"""KV cache, prefill/decode, generation against HF transformers, compiled decode, streaming."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gptfn import GPTModel, KVCache, BPETokenizer, gpt_forward, generate, init_params, left_pad, stream
from gptfn.kv_cache import decode_step, prefill
from tests.helpers import random_idx, randomize_ln_and_biases, tiny_config

transformers = pytest.importorskip("transformers")


def model_and_params(cfg, seed=0):
    params = randomize_ln_and_biases(init_params(cfg, seed), seed + 1)
    return GPTModel(cfg, params=params).eval(), params


@given(
    cfg=st.builds(tiny_config, num_heads=st.sampled_from([1, 4]), num_layers=st.integers(1, 2)),
    batch=st.integers(1, 3), length=st.integers(2, 24), data=st.data(),
)
def test_cached_logits_equal_uncached(cfg, batch, length, data):
    params = randomize_ln_and_biases(init_params(cfg, 0))
    idx = random_idx(cfg, batch, length, seed=length)
    split = data.draw(st.integers(1, length - 1), label="prompt length")
    full = gpt_forward(params, idx, cfg)  # (B, T, V)
    cache = KVCache.create(cfg, batch, data.draw(st.integers(length, cfg.context_length), label="max_len"))
    # start=None: the unpadded prefill (causal over the prompt alone); zeros: the masked
    # attention over the whole cache that left-padded prompts take. Both must be exact.
    start = data.draw(st.sampled_from([None, torch.zeros(batch, dtype=torch.long)]), label="start")
    logits, cache = prefill(params, idx[:, :split], cache, cfg, start)
    torch.testing.assert_close(logits, full[:, split - 1], atol=1e-5, rtol=0)
    for t in range(split, length):
        logits, cache = decode_step(params, idx[:, t], cache, torch.tensor([t]), cfg)
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=0)


def test_module_prefill_and_decode_step_match_functional():
    cfg = tiny_config()
    model, params = model_and_params(cfg)
    idx = random_idx(cfg, 2, 9)
    c1, c2 = KVCache.create(cfg, 2, 12), KVCache.create(cfg, 2, 12)
    a, c1 = model.prefill(idx, c1)
    b, c2 = prefill(params, idx, c2, cfg)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    a, _ = model.decode_step(idx[:, 0], c1, torch.tensor([9]))
    b, _ = decode_step(params, idx[:, 0], c2, torch.tensor([9]), cfg)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def hf_from(cfg, params, tmp_path):
    from gptfn import save_params

    save_params(params, tmp_path, cfg)
    return transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()


@pytest.mark.parametrize("overrides", [
    dict(num_heads=4, num_layers=2),
    dict(num_heads=1, num_layers=3),
    dict(num_heads=8, num_layers=1, embed_dim=64, vocab_size=301),
])
def test_greedy_tokens_equal_hf_generate(tmp_path, overrides):
    cfg = tiny_config(context_length=64, **overrides)
    model, params = model_and_params(cfg, seed=sum(overrides.values()))
    hf = hf_from(cfg, params, tmp_path)
    idx = random_idx(cfg, 2, 10, seed=5)
    want = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=40,
                       do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, idx, 40), want)
    assert torch.equal(generate((cfg, params), idx, 40), want)


def test_batched_prompts_with_padding_equal_each_alone():
    cfg = tiny_config(context_length=64)
    model, _ = model_and_params(cfg, seed=3)
    prompts = [random_idx(cfg, 1, n, seed=n)[0].tolist() for n in (3, 11, 1, 7)]
    idx, mask = left_pad(prompts, pad_id=5)
    out = generate(model, idx, 20, attention_mask=mask)
    assert out.shape == (4, 11 + 20)
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), 20)
        assert torch.equal(out[row, -20:], alone[0, -20:]), row



def test_eos_rows_are_padded_with_eos():
    cfg = tiny_config(context_length=64)
    model, _ = model_and_params(cfg, seed=5)
    idx = random_idx(cfg, 3, 5, seed=0)
    free = generate(model, idx, 20)
    eos = int(free[0, 5 + 4])  # the token row 0 produces at its fifth step
    out = generate(model, idx, 20, eos_id=eos)
    assert out.shape == free.shape
    for row in range(3):
        new = out[row, 5:].tolist()
        ref = free[row, 5:].tolist()
        if eos in ref:
            k = ref.index(eos)
            assert new[: k + 1] == ref[: k + 1] and all(t == eos for t in new[k:])
        else:
            assert new == ref
    # the cases this test is for: a row that ends early (padded after), and one that never
    # produces eos (left as it was)
    ends = [free[row, 5:].tolist().index(eos) if eos in free[row, 5:].tolist() else None
            for row in range(3)]
    assert ends[0] is not None and ends[0] <= 4 and None in ends


def test_seeded_sampling_reproducible_and_top_k_1_is_greedy():
    cfg = tiny_config(context_length=64)
    model, _ = model_and_params(cfg, seed=6)
    idx = random_idx(cfg, 2, 4)
    run = lambda seed, **kw: generate(model, idx, 25, temperature=1.0,
                                      generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    assert torch.equal(run(3, top_k=1), generate(model, idx, 25))
    assert torch.equal(run(3, top_p=0.7), run(3, top_p=0.7))
    # top-p: each sampled token is in its step's nucleus (the tokens more probable than it
    # hold less than p of the mass), which sampling without it leaves
    assert _outside_nucleus(model, run(3, top_p=0.7), 4, 0.7) == 0
    assert _outside_nucleus(model, run(3), 4, 0.7) > 0


def _outside_nucleus(model, out: torch.Tensor, prompt: int, p: float) -> int:
    """How many of ``out``'s new tokens lie outside the top-p nucleus of their step."""
    with torch.no_grad():
        probs = torch.softmax(model(out[:, :-1]).double(), dim=-1)[:, prompt - 1:]  # (B, N, V)
    new = out[:, prompt:]  # (B, N)
    chosen = probs.gather(-1, new[..., None])  # (B, N, 1)
    better = torch.where(probs > chosen, probs, 0.0).sum(-1)  # (B, N)
    return int((better >= p - 1e-9).sum())


def test_compiled_decode_equals_eager_and_never_recompiles():
    from torch._dynamo.utils import counters

    cfg = tiny_config(context_length=300)
    model, params = model_and_params(cfg, seed=7)
    idx = random_idx(cfg, 1, 8)
    torch._dynamo.reset()
    counters.clear()
    compiled = generate(model, idx, 256, compile=True)
    assert counters["stats"]["unique_graphs"] == 1  # one compile, for all 255 decode steps
    assert not counters["graph_break"]
    assert torch.equal(compiled, generate(model, idx, 256))
    counters.clear()  # warm: the same shapes again compile nothing
    assert torch.equal(generate((cfg, params), idx, 256, compile=True), compiled)
    assert counters["stats"]["unique_graphs"] == 0


def test_compiled_generation_of_many_shapes_compiles_a_few_times():
    """A process that generates at many prompt lengths and batch sizes (a server) compiles
    the decode step for the first shapes and once or twice more with the sizes that changed
    symbolic, not once per size: with a capture per size, the ninth raised torch's
    FailOnRecompileLimitHit (fullgraph=True)."""
    from torch._dynamo.utils import counters

    cfg = tiny_config(context_length=64)
    model, _ = model_and_params(cfg, seed=9)
    torch._dynamo.reset()
    counters.clear()
    for i, (batch, length) in enumerate([(1, 3), (1, 5), (2, 4), (1, 7), (3, 2), (2, 9),
                                         (1, 11), (4, 6), (2, 13), (1, 15), (3, 17)]):
        idx = random_idx(cfg, batch, length, seed=i)
        assert torch.equal(generate(model, idx, 4 + i, compile=True),
                           generate(model, idx, 4 + i))
    assert counters["stats"]["unique_graphs"] <= 3


def test_stream_yields_tokens_and_text():
    cfg = tiny_config(vocab_size=50257, context_length=64)
    model, _ = model_and_params(cfg, seed=8)
    tok = BPETokenizer()
    idx = torch.tensor([tok.encode("Hello"), tok.encode("World")])
    pieces = list(stream(model, idx, 12, tokenizer=tok))
    full = generate(model, idx, 12)
    ids = [p.ids for p in pieces if p.ids]
    assert torch.equal(torch.tensor(ids).T, full[:, 1:])
    for row in range(2):
        text = "".join(p.texts[row] for p in pieces)
        assert text == tok.decode(full[row, 1:].tolist())


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=1.2), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=30), "exceeds context_length 32"),
    (dict(eos_id=97), "eos_id"),
])
def test_bad_generation_arguments(kwargs, match):
    cfg = tiny_config()
    model, _ = model_and_params(cfg)
    args = dict(max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, random_idx(cfg, 1, 5), **args)


@pytest.mark.parametrize("idx, match", [
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.tensor([[1, 97]]), "vocab"),
    (torch.zeros(1, 33, dtype=torch.long), "context_length"),
])
def test_bad_prompts(idx, match):
    cfg = tiny_config()
    model, _ = model_and_params(cfg)
    with pytest.raises(ValueError, match=match):
        generate(model, idx, 1)


def test_bad_padding_and_cache():
    cfg = tiny_config()
    model, params = model_and_params(cfg)
    idx = random_idx(cfg, 2, 4)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, idx, 2, attention_mask=torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="no tokens"):
        generate(model, idx, 2, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="empty prompt"):
        left_pad([[1, 2], []])
    with pytest.raises(ValueError, match="batch_size 3"):
        prefill(params, idx, KVCache.create(cfg, 3, 8), cfg)
    with pytest.raises(ValueError, match="do not fit the cache's max_len 3"):
        prefill(params, idx, KVCache.create(cfg, 2, 3), cfg)
    with pytest.raises(ValueError, match="max_len 40 exceeds"):
        KVCache.create(cfg, 2, 40)
    with pytest.raises(ValueError, match="model must be"):
        generate(object(), idx, 2)


def test_gpt_forward_with_a_cache():
    cfg = tiny_config()
    _, params = model_and_params(cfg, seed=11)
    idx = random_idx(cfg, 2, 10)
    full = gpt_forward(params, idx, cfg)
    cache = KVCache.create(cfg, 2, 16)
    first = gpt_forward(params, idx[:, :6], cfg, cache=cache, input_pos=torch.arange(6))
    rest = gpt_forward(params, idx[:, 6:], cfg, cache=cache, input_pos=torch.arange(6, 10))
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="input_pos"):
        gpt_forward(params, idx, cfg, cache=cache)
    with pytest.raises(ValueError, match="input_pos must have shape"):
        gpt_forward(params, idx, cfg, cache=cache, input_pos=torch.arange(3))
