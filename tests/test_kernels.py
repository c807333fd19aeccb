"""gptfn::rowmul, the product for weights in a weight-only format, against a plain fp32
product of the dequantized weight; and the formats through compile and export."""

import pytest
import torch

from gptfn import GPTModel
from gptfn.generation import generate
from gptfn.kernels import load, route
from gptfn.scripting import script
from gptfn.quantize import dequantize_params, int8_per_channel, quantize
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
@pytest.mark.parametrize("rows", [1, 3, 8, 9])  # 9: past the kernel, the dequantized BLAS route
@pytest.mark.parametrize("n_in, n_out", [(64, 256), (77, 35), (300, 1000)])  # odd: the tails
def test_rowmul_equals_the_dequantized_product(dtype, transposed, rows, n_in, n_out):
    gen = torch.Generator().manual_seed(n_in * rows + n_out)
    dim = 0 if transposed else 1  # output channels: rows of [out, in], columns of [in, out]
    shape = (n_out, n_in) if transposed else (n_in, n_out)
    w, scale, dense = _weight(dtype, *shape, dim, gen)
    x = torch.randn(rows, 1, n_in, generator=gen)
    bias = torch.randn(n_out, generator=gen)
    want = x @ (dense.t() if transposed else dense) + bias  # (rows, 1, out)
    got = torch.ops.gptfn.rowmul(x, w, scale, bias, transposed)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("scheme", ["bf16", "fp16", "int8"])
def test_generation_takes_the_kernel_route_for_a_format(scheme, monkeypatch):
    cfg = tiny_config()
    model = quantize(GPTModel(cfg, seed=0).eval(), scheme)
    idx = random_idx(cfg, 2, 5)
    rewritten = []
    real = route.rewrite
    monkeypatch.setattr(route, "rewrite", lambda gm: rewritten.append(real(gm)) or rewritten[-1])
    torch._dynamo.reset()
    eager = generate(model, idx, 6)
    assert rewritten == [4 * cfg.num_layers + 1]  # every matrix and the tied head
    assert torch.equal(generate(model, idx, 6, compile=True), eager)
    assert rewritten[-1] == 4 * cfg.num_layers + 1
    with torch.no_grad():  # the route computes what the core computes
        logits = model(torch.cat([idx, eager[:, 5:]], 1))
    assert torch.equal(logits[:, 4:-1].argmax(-1), eager[:, 5:])


def test_a_plain_model_is_not_rewritten(monkeypatch):
    cfg = tiny_config()
    seen = []
    monkeypatch.setattr(route, "rewrite", lambda gm: seen.append(gm))
    torch._dynamo.reset()
    generate(GPTModel(cfg, seed=0).eval(), random_idx(cfg, 1, 4), 3, compile=True)
    assert not seen


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
