"""The CUDA paths: parity on the GPU, compiled decode with CUDA graphs, bf16 training, the
benchmark suite on a device. Each test needs a CUDA GPU and is skipped where there is none
(this project's CPU machine); run ``pytest tests/test_cuda.py`` on a GPU machine."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptfn import GPTModel, TextDataset
from gptfn.generation import generate
from tests.helpers import hf_logits, hf_model, random_idx, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]


def test_fp32_and_bf16_logits_match_hf_on_the_gpu():
    cfg = tiny_config(vocab_size=256, context_length=64, embed_dim=64)
    hf = hf_model(cfg)
    idx = random_idx(cfg, 2, 48)
    expected = hf_logits(hf, idx)  # the CPU fp32 oracle
    ours = GPTModel(cfg, params={k: v for k, v in hf.transformer.state_dict().items()
                                 if not k.endswith((".attn.bias", ".attn.masked_bias"))}).eval()
    with torch.no_grad():
        got = ours.to("cuda")(idx.cuda()).cpu()
        assert torch.allclose(got, expected, atol=1e-4)
        half = ours.to(torch.bfloat16)(idx.cuda()).float().cpu()
    rel = (half - expected).norm() / expected.norm()
    assert rel < 3e-2


def test_compiled_decode_with_cuda_graphs_matches_eager_without_recompiling():
    from torch._dynamo.utils import counters

    cfg = tiny_config(vocab_size=256, context_length=64, embed_dim=64)
    model = GPTModel(cfg, seed=0).eval().cuda()
    idx = random_idx(cfg, 2, 8).cuda()
    eager = generate(model, idx, 40)
    compiled = generate(model, idx, 40, compile=True)
    assert torch.equal(eager, compiled)
    counters.clear()
    again = generate(model, idx, 40, compile=True)  # same shapes: no new graph
    assert torch.equal(again, eager)
    assert counters["stats"]["unique_graphs"] == 0


def test_bf16_autocast_training_learns_on_the_gpu(tmp_path):
    from gptfn.train import TrainSettings, train

    pattern = [(i * 7) % 23 for i in range(460)]
    tr = TextDataset(pattern, context_size=16, stride=4)
    va = TextDataset(pattern[:120], context_size=16, stride=16)
    model = GPTModel(tiny_config(vocab_size=32, context_length=16), seed=0)
    settings = TrainSettings(max_steps=150, batch_size=4, lr=3e-3, warmup_steps=3,
                             eval_interval=10, eval_batches=2)
    result = train(model, tr, va, settings, tmp_path, device="cuda", progress=False)
    first, last = result["metrics"][0], result["metrics"][-1]
    assert last["train_loss"] < 0.3 < first["train_loss"]
    assert next(model.parameters()).dtype == torch.float32  # autocast, fp32 master weights


def test_quick_benchmarks_on_the_gpu(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks", "decode", "prefill", "training",
                        "loading", "memory", "compile", "artifacts", "--quick", "--device",
                        "cuda", "--dtype", "bf16",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    decode = json.loads((tmp_path / "decode.json").read_text())
    assert decode["dtype"] == "bf16" and decode["environment"]["gpu"]
    assert [row["variant"] for row in decode["rows"]] == ["hf", "hf_compiled", "eager",
                                                          "compiled"]
    assert all(row["tokens_per_s"] > 0 for row in decode["rows"])
    memory = json.loads((tmp_path / "memory.json").read_text())
    assert memory["measure"] == "CUDA allocated"
    assert all(row["peak_mb"] >= row["after_build_mb"] > 0 for row in memory["rows"])


def test_quick_fp32_decode_runs_on_the_gpu(tmp_path):
    # fp32 on a GPU: the benchmark's model moves to the device though its dtype stays
    # (a dtype-only condition once left it on the CPU)
    r = subprocess.run([sys.executable, "-m", "benchmarks", "decode", "--quick", "--device",
                        "cuda", "--dtype", "fp32", "--batch-size", "1", "--peers", "none",
                        "--rounds", "1", "--out", str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    decode = json.loads((tmp_path / "decode.json").read_text())
    assert decode["dtype"] == "fp32" and decode["device"].startswith("cuda")
    assert all(row["tokens_per_s"] > 0 for row in decode["rows"])


def test_cuda_events_time_device_work():
    from benchmarks.device import Clock

    clock = Clock("cuda")
    x = torch.randn(2048, 2048, device="cuda")
    clock.sync()
    start = clock.stamp()
    for _ in range(20):
        x = x @ x / 2048
    seconds = clock.seconds(start, clock.stamp())
    assert 0 < seconds < 10


@pytest.mark.parametrize("scheme", ["bf16", "int8"])
def test_weight_formats_generate_on_the_gpu(scheme):
    import gptfn

    cfg = tiny_config(vocab_size=256, context_length=64, embed_dim=64)
    model = gptfn.quantize(GPTModel(cfg, seed=0).eval(), scheme)
    idx = random_idx(cfg, 2, 16)
    with torch.no_grad():
        expected = model(idx)  # the CPU route of the same format
        gpu = model.to("cuda")
        assert all(t.device.type == "cuda" for t in gpu.state_dict().values())
        got = gpu(idx.cuda()).cpu()
    assert (got - expected).abs().max() < 1e-3
    eager = generate(gpu, idx.cuda(), 24)
    assert torch.equal(generate(gpu, idx.cuda(), 24, compile=True), eager)
