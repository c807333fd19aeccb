"""gptfn::rowmul, the product for weights in a weight-only format, against a plain fp32
product of the dequantized weight (for int8, of activations quantized per 32 values, as the
op's int8 route takes them); and the formats through compile and export."""

import pytest
import torch

from gptfn import GPTModel
from gptfn.generation import generate
from gptfn.kernels import load, route
from gptfn.quantization import dequantize_params, int8_per_channel, quantize
from gptfn.scripting import script
from tests.helpers import random_idx, tiny_config

load()


def _weight(dtype, rows, cols, dim, gen):
    w = torch.randn(rows, cols, generator=gen) * 0.05
    if dtype == torch.int8:
        q, scale = int8_per_channel(w, dim)
        return q, scale, q.float() * scale.unsqueeze(1 - dim)
    w = w.to(dtype)
    return w, None, w.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("transposed", [False, True])
# 5-8 rows: bf16 takes four rows of x at a time, then the rest; 9: past the kernel (BLAS)
@pytest.mark.parametrize("rows", [1, 3, 5, 6, 7, 8, 9])
# odd sizes: the tails; 1601 outputs: the eight-row passes over long rows
@pytest.mark.parametrize("n_in, n_out", [(64, 256), (77, 35), (300, 1000), (45, 1601)])
def test_rowmul_equals_the_dequantized_product(dtype, transposed, rows, n_in, n_out):
    gen = torch.Generator().manual_seed(n_in * rows + n_out)
    dim = 0 if transposed else 1  # output channels: rows of [out, in], columns of [in, out]
    shape = (n_out, n_in) if transposed else (n_in, n_out)
    w, scale, dense = _weight(dtype, *shape, dim, gen)
    x = torch.randn(rows, 1, n_in, generator=gen)
    bias = torch.randn(n_out, generator=gen)
    dense = dense.t() if transposed else dense
    xin = _q8_activations(x) if dtype == torch.int8 else x
    want = xin @ dense + bias  # (rows, 1, out)
    got = torch.ops.gptfn.rowmul(x, w, scale, bias, transposed)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if dtype == torch.int8:  # what quantizing the activations costs: about half a percent
        exact = x @ dense + bias
        assert ((got - exact).norm() / exact.norm()) < 2e-2


def _q8_activations(x):
    """x quantized as int8 weights meet it: symmetric, one scale (max |x| / 127) per 32
    consecutive values of a row, rounded to nearest, widened back."""
    out = torch.empty_like(x)
    for c in range(0, x.size(-1), 32):
        block = x[..., c:c + 32]
        amax = block.abs().amax(-1, keepdim=True)
        inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
        out[..., c:c + 32] = torch.round(block * inv) * (amax / 127)
    return out


@pytest.mark.parametrize("rows, heads, new, slots, hs", [(1, 12, 1, 192, 64), (3, 4, 2, 37, 20)])
def test_cached_attention_equals_torchs_masked_attention(rows, heads, new, slots, hs):
    """Against F.scaled_dot_product_attention under the masks a decode step makes: left
    padded rows (a padding token attends to itself only), and a mask shared by all rows."""
    from gptfn.functional import attention_mask

    gen = torch.Generator().manual_seed(rows * slots + hs)
    q = torch.randn(rows, heads, new, hs, generator=gen)
    k, v = (torch.randn(rows, heads, slots, hs, generator=gen) for _ in range(2))
    pos = torch.arange(slots - new - 3, slots - 3)  # (new,): the last slots stay empty
    start = torch.randint(0, slots - new - 3, (rows,), generator=gen)
    for mask in (attention_mask(pos, start, slots), attention_mask(pos, start[:1], slots)):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = torch.ops.gptfn.cached_attention(q, k, v, mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rowmul_edge_inputs():
    """An empty sum is the bias; a NaN or an infinity in the activations reaches the int8
    product's outputs as NaN, as in the unquantized product, not as a finite number."""
    got = torch.ops.gptfn.rowmul(torch.ones(2, 0), torch.ones(0, 5), None, torch.arange(5.0),
                                 False)
    assert torch.equal(got, torch.arange(5.0).expand(2, 5))
    q, scale = int8_per_channel(torch.randn(64, 40), 1)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, 64)
        x[0, 3] = bad
        for w, transposed in ((q, False), (q.t().contiguous(), True)):
            assert torch.isnan(torch.ops.gptfn.rowmul(x, w, scale, None, transposed)).all()


def test_the_attention_rewrite_takes_only_what_its_kernel_computes():
    """A per-head mask or a value width other than the queries' stays torch's attention."""
    def f(q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    counts = []

    def backend(gm, example_inputs):
        counts.append(route.rewrite(gm))
        return gm.forward

    q, k = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 10, 8)
    shared, per_head = torch.rand(2, 1, 1, 10) < 0.7, torch.rand(2, 3, 1, 10) < 0.7
    shared[..., 0] = per_head[..., 0] = True
    for v, mask, rewritten in ((torch.randn(2, 3, 10, 8), shared, 1),
                               (torch.randn(2, 3, 10, 8), per_head, 0),
                               (torch.randn(2, 3, 10, 6), shared, 0)):
        torch._dynamo.reset()
        counts.clear()
        got = torch.compile(f, backend=backend, fullgraph=True)(q, k, v, mask)
        assert counts == [rewritten]
        torch.testing.assert_close(got, f(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_rowmul_refuses_what_it_cannot_compute():
    x, w = torch.randn(1, 8), torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="int8 weights need a scale"):
        torch.ops.gptfn.rowmul(x, w.to(torch.int8), None, None, False)
    with pytest.raises(RuntimeError, match="x has 8 features, the weight takes 4"):
        torch.ops.gptfn.rowmul(x, w.t().contiguous(), None, None, False)
    with pytest.raises(RuntimeError, match="fp32 activations"):
        torch.ops.gptfn.rowmul(x.double(), w, None, None, False)
    with pytest.raises(RuntimeError, match="the scale must be 4 fp32 values"):
        torch.ops.gptfn.rowmul(x, w.to(torch.int8), torch.ones(3), None, False)


@pytest.mark.parametrize("scheme", ["bf16", "int8"])
def test_the_core_runs_a_format_in_plain_aten_everywhere(scheme):
    cfg = tiny_config()
    model = quantize(GPTModel(cfg, seed=0).eval(), scheme)
    idx = random_idx(cfg, 2, 5)
    with torch.no_grad():
        eager = model(idx)
        plain = GPTModel(cfg, params=dequantize_params(model.state_dict())).eval()(idx)
        torch.testing.assert_close(eager, plain, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(script(model)(idx), eager, atol=1e-5, rtol=1e-5)
        compiled = torch.compile(model, fullgraph=True)(idx)
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
        program = torch.export.export(model, (idx,))
    # the core never calls gptfn's op: the kernel is a caller's choice (gptfn.kernels.route)
    assert not [n for n in program.graph.nodes if "gptfn" in str(n.target)]
    torch.testing.assert_close(program.module()(idx), eager, atol=1e-5, rtol=1e-5)


def _count_rewrites(monkeypatch) -> list:
    """A list that gets how many products each route rewrite replaces, from a fresh
    torch.compile cache."""
    rewritten = []
    real = route.rewrite
    monkeypatch.setattr(route, "rewrite", lambda gm: rewritten.append(real(gm)) or rewritten[-1])
    torch._dynamo.reset()
    return rewritten


@pytest.mark.parametrize("scheme", ["bf16", "fp16", "int8"])
def test_generation_takes_the_kernel_route_for_a_format(scheme, monkeypatch):
    cfg = tiny_config()
    model = quantize(GPTModel(cfg, seed=0).eval(), scheme)
    idx = random_idx(cfg, 2, 5)
    rewritten = _count_rewrites(monkeypatch)
    eager = generate(model, idx, 6)
    assert rewritten == [5 * cfg.num_layers + 1]  # each matrix, the head, each attention
    assert torch.equal(generate(model, idx, 6, compile=True), eager)
    assert rewritten[-1] == 5 * cfg.num_layers + 1
    with torch.no_grad():  # the route computes what the core computes
        logits = model(torch.cat([idx, eager[:, 5:]], 1))
    assert torch.equal(logits[:, 4:-1].argmax(-1), eager[:, 5:])


def test_a_plain_fp32_model_takes_the_kernel_only_when_compiled(monkeypatch):
    """Eager generation of a plain model is the core itself; compile=True on the CPU is the
    caller's choice of a compiled step, and that step's products (every block matrix with
    its bias, and the tied head) go to gptfn's kernel, with the same tokens as eager."""
    cfg = tiny_config()
    model = GPTModel(cfg, seed=0).eval()
    idx = random_idx(cfg, 2, 4)
    rewritten = _count_rewrites(monkeypatch)
    eager = generate(model, idx, 5)
    assert not rewritten
    assert torch.equal(generate(model, idx, 5, compile=True), eager)
    assert rewritten == [5 * cfg.num_layers + 1]  # and each layer's attention


def test_the_rewrite_leaves_other_products_alone():
    """Only fp32 products over a weight that is a graph input are plain: a product over a
    computed matrix (here x @ (2x).T) or over fp64 stays aten."""
    def f(x, w, b, d):
        return (torch.nn.functional.linear(x, x * 2) + torch.nn.functional.linear(x, w.t(), b)
                + torch.nn.functional.linear(d, d.t()).sum())

    counts = []

    def backend(gm, example_inputs):
        counts.append(route.rewrite(gm))
        return gm.forward

    x, w, b = torch.randn(3, 4), torch.randn(4, 3), torch.randn(3)
    d = torch.randn(2, 2, dtype=torch.float64)
    torch._dynamo.reset()
    got = torch.compile(f, backend=backend, fullgraph=True)(x, w, b, d)
    assert counts == [1]  # linear(x, w.t(), b) alone
    torch.testing.assert_close(got, f(x, w, b, d))


def test_formats_refuse_misuse(tmp_path):
    cfg = tiny_config()
    model = GPTModel(cfg, seed=0).eval()
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        quantize(model, "int3")
    q = quantize(model, "int8")
    with pytest.raises(ValueError, match="already in the int8 format"):
        quantize(q, "bf16")
    params = dict(q.state_dict())
    del params["h.0.mlp.c_fc.weight_scale"]
    with pytest.raises(ValueError, match="h.0.mlp.c_fc.weight: an int8 matrix needs"):
        GPTModel(cfg, params=params)
    params = quantize(model.state_dict(), "bf16")
    params["h.1.mlp.c_fc.weight"] = params["h.1.mlp.c_fc.weight"].half()
    with pytest.raises(ValueError, match="matrices are in several formats"):
        GPTModel(cfg, params=params)
    q.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="int8 format, which computes in fp32"):
        GPTModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    config = tmp_path / "config.json"
    config.write_text(config.read_text().replace('"scheme": "int8"', '"scheme": "bf16"'))
    with pytest.raises(ValueError, match="records the weight format bf16, the weights are int8"):
        GPTModel.from_pretrained(tmp_path)


def test_the_eager_route_takes_any_number_of_shapes():
    """Batch sizes and lengths vary between calls: past the second, the route's capture is
    dynamic instead of one more per shape (torch.compile's limit is 8 per function)."""
    cfg = tiny_config()
    model = quantize(GPTModel(cfg, seed=0).eval(), "int8")
    torch._dynamo.reset()
    for rows in range(1, 11):
        idx = random_idx(cfg, rows, 2 + rows % 3)
        out = generate(model, idx, 2 + rows % 4)
        with torch.no_grad():
            logits = model(out[:, :-1])
        assert torch.equal(logits[:, idx.size(1) - 1:].argmax(-1), out[:, idx.size(1):])
