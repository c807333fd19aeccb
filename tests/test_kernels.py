"""gptfn::rowmul, the product for weights in a weight-only format, against a plain fp32
product of the dequantized weight (for int8 and int4, of activations quantized per 32
values, as the op's integer routes take them); and the formats through compile and export."""

import pytest
import torch

from gptfn import GPTModel
from gptfn.generation import generate
from gptfn.kernels import load, route
from gptfn.functional.layers import unpack_int4
from gptfn.quantization import dequantize_params, int4_groupwise, int8_per_channel, quantize
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


# 1-8 rows: the integer loop, one row of x at a time; 9: past the kernel (BLAS)
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
# odd output counts: the tail past the last 32; 3072 inputs: several runs per thread
@pytest.mark.parametrize("n_in, n_out", [(64, 256), (96, 35), (3072, 1000), (32, 1601)])
def test_int4_rowmul_equals_the_dequantized_product(rows, n_in, n_out):
    gen = torch.Generator().manual_seed(n_in * rows + n_out)
    packed, scale = int4_groupwise(torch.randn(n_in, n_out, generator=gen) * 0.05)
    dense = unpack_int4(packed, scale, torch.float32)  # (in, out)
    x = torch.randn(rows, 1, n_in, generator=gen)
    bias = torch.randn(n_out, generator=gen)
    want = _q8_activations(x) @ dense + bias  # (rows, 1, out)
    got = torch.ops.gptfn.rowmul(x, packed, scale, bias, False)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_int4_packs_llama_cpps_q4_0_levels():
    """Each group of 32 inputs: its value of largest magnitude is exactly -8 scales, the
    others round to the nearest of the 16 levels; pairs of inputs share a byte, low first."""
    w = torch.zeros(64, 2)
    w[:32, 0] = torch.linspace(-1.0, 0.5, 32)  # extreme -1: scale 1/8, 0.5 -> +4
    w[32:, 0] = 0.0  # an all-zero group: scale 0, every value exactly 0
    w[:32, 1] = torch.linspace(-0.3, 2.0, 32)  # extreme 2: scale -1/4, -0.3 -> +1 (rounded)
    packed, scale = int4_groupwise(w)
    assert packed.shape == (32, 2) and packed.dtype == torch.uint8
    assert scale.shape == (2, 2) and scale.dtype == torch.float16
    assert scale.float().tolist() == [[0.125, -0.25], [0.0, 0.0]]
    q = unpack_int4(packed, scale, torch.float32)
    assert q[0, 0] == -1.0 and q[31, 0] == 0.5 and q[31, 1] == 2.0 and q[0, 1] == -0.25
    assert torch.equal(q[32:, 0], torch.zeros(32))
    assert int(packed[0, 0]) == (-8 + 8) | ((round(float(w[1, 0]) / 0.125) + 8) << 4)
    assert (q - w).abs().max() <= 0.25 / 2 + 1e-6  # half a level of the coarsest group


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
    packed, groups = int4_groupwise(torch.randn(64, 40))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, 64)
        x[0, 3] = bad
        for w, s, transposed in ((q, scale, False), (q.t().contiguous(), scale, True),
                                 (packed, groups, False)):
            assert torch.isnan(torch.ops.gptfn.rowmul(x, w, s, None, transposed)).all()


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
    with pytest.raises(RuntimeError, match="int8 and int4 weights need a scale"):
        torch.ops.gptfn.rowmul(x, w.to(torch.int8), None, None, False)
    packed, groups = int4_groupwise(torch.randn(64, 4))
    x64 = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="int4 weights are \\[in/2, out\\], not transposed"):
        torch.ops.gptfn.rowmul(x64, packed, groups, None, True)
    with pytest.raises(RuntimeError, match="fp16 scales of shape \\[2, 4\\]"):
        torch.ops.gptfn.rowmul(x64, packed, groups.float(), None, False)
    with pytest.raises(RuntimeError, match="x has 8 features, the weight takes 4"):
        torch.ops.gptfn.rowmul(x, w.t().contiguous(), None, None, False)
    with pytest.raises(RuntimeError, match="fp32 activations"):
        torch.ops.gptfn.rowmul(x.double(), w, None, None, False)
    with pytest.raises(RuntimeError, match="the scale must be 4 fp32 values"):
        torch.ops.gptfn.rowmul(x, w.to(torch.int8), torch.ones(3), None, False)


@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4"])
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


@pytest.mark.parametrize("scheme", ["bf16", "fp16", "int8", "int4"])
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


def test_the_int4_rewrite_leaves_no_unpacking_behind():
    """Each int4 product's unpacking (9 ops in either graph) goes with it: in torch.export's
    graph and in torch.compile's, only the embedding's (one shift) is left."""
    cfg = tiny_config()
    model = quantize(GPTModel(cfg, seed=0).eval(), "int4")
    idx = random_idx(cfg, 1, 5)

    def shifts(graph):
        return sum("rshift" in str(n.target) for n in graph.nodes)

    program = torch.export.export(model, (idx,))
    assert shifts(program.graph) == 4 * cfg.num_layers + 2  # each matrix, the head, embedding
    assert route.rewrite(program.graph_module) == 4 * cfg.num_layers + 1
    assert shifts(program.graph) == 1
    counts = []

    def backend(gm, example_inputs):
        counts.append((route.rewrite(gm), shifts(gm.graph)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(idx)
        torch.testing.assert_close(got, model(idx), atol=2e-2, rtol=2e-2)
    assert counts == [(4 * cfg.num_layers + 1, 1)]


def test_the_int4_route_holds_in_a_capture_made_dynamic(monkeypatch):
    """One model after another in one process: when an int4 model's packed shapes follow a
    bf16 model's, the eager route's capture of the decode step turns dynamic, and its int4
    products must still go to the kernel (a rewrite that compared sizes exactly left such a
    capture to the core's unpacking: GPT-2 124M decoded at 4 tokens/s)."""
    cfg = tiny_config()
    base = GPTModel(cfg, seed=0).eval()
    idx = random_idx(cfg, 1, 5)
    rewritten = _count_rewrites(monkeypatch)
    bf16 = quantize(base, "bf16")
    generate(bf16, idx, 3)
    generate(bf16, idx, 6)  # another cache length: the capture turns dynamic
    symbolic = []
    real = route.rewrite

    def rewrite(gm):
        symbolic.append(any(isinstance(d, torch.SymInt) for n in gm.graph.nodes
                            if isinstance(v := n.meta.get("example_value"), torch.Tensor)
                            for d in v.shape))
        return real(gm)

    monkeypatch.setattr(route, "rewrite", rewrite)
    int4 = quantize(base, "int4")
    out = generate(int4, idx, 3)
    assert symbolic == [True]  # the case this test is for
    # each matrix and the head (attention over dynamic sizes stays torch's, by design)
    assert rewritten[-1] == 4 * cfg.num_layers + 1
    with torch.no_grad():
        logits = int4(out[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])


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
    spoiled = [  # (format, what is done to its parameters, the error that names it)
        ("int8", lambda p: p.pop("h.0.mlp.c_fc.weight_scale"),
         "h.0.mlp.c_fc.weight: an int8 matrix needs"),
        ("bf16", lambda p: p.update({"h.1.mlp.c_fc.weight": p["h.1.mlp.c_fc.weight"].half()}),
         "matrices are in several formats"),
        ("int4", lambda p: p.update({"wte.weight_scale": p["wte.weight_scale"].float()}),
         "wte.weight_scale: expected fp16 of shape \\[1, 97\\]"),
        ("int4", lambda p: p.update({"h.0.attn.c_proj.weight": p["h.0.attn.c_proj.weight"].t()}),
         "h.0.attn.c_proj.weight: expected shape \\[16, 32\\]"),
    ]
    for scheme, spoil, message in spoiled:
        params = quantize(model.state_dict(), scheme)
        spoil(params)
        with pytest.raises(ValueError, match=message):
            GPTModel(cfg, params=params)
    with pytest.raises(ValueError, match="int4 needs the inputs of each matrix in whole "
                                         "groups of 32, got 48"):
        quantize(GPTModel(tiny_config(embed_dim=48, num_heads=4), seed=0), "int4")
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
