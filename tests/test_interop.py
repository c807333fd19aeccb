"""GGUF and ONNX exports run in llama.cpp and ONNX Runtime and compute what gptfn computes.

Each export is checked twice: by the export suite itself (which refuses to keep a file its
engine does not run as gptfn does), and here, by running the kept file the way a user of the
engine would, with no gptfn code in the loop: llama.cpp's own generation loop and tokenizer
(``tests/llama_probe.py``), and ONNX Runtime driven by hand like optimum's
``ORTModelForCausalLM`` (batched, left-padded, positions from the attention mask).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptfn import BPETokenizer, GPTConfig, GPTModel, generate, init_params
from tests.helpers import randomize_ln_and_biases, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _missing(*modules):
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{', '.join(gone)} not installed (the interop extra: pip install -e '.[interop]')"\
        if gone else None


NO_LLAMA = _missing("gguf", "llama_cpp")
NO_ONNX = _missing("onnx", "onnxscript", "onnxruntime")
needs_llama = pytest.mark.skipif(NO_LLAMA is not None, reason=NO_LLAMA or "")
needs_onnx = pytest.mark.skipif(NO_ONNX is not None, reason=NO_ONNX or "")
TEXT = "Hello, world! Café 東京 😀 — 1234 and 3.14;\tthe  end\n"


def _save(path: Path, cfg: GPTConfig, seed: int) -> Path:
    params = randomize_ln_and_biases(init_params(cfg, seed), seed + 1)
    GPTModel(cfg, params=params).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A small model over GPT-2's whole vocabulary (its tokenizer applies)."""
    cfg = GPTConfig(vocab_size=50257, context_length=64, embed_dim=64, num_layers=2,
                    num_heads=4, dropout_rate=0.0)
    return _save(tmp_path_factory.mktemp("bpe"), cfg, 3)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny model of a 97-id vocabulary, no qkv bias, 40 positions."""
    return _save(tmp_path_factory.mktemp("tiny"), tiny_config(context_length=40, qkv_bias=False), 5)


def export(*args):
    from export.__main__ import main

    return main([str(a) for a in args])


# --- the tokenizer in GGUF form -------------------------------------------------------------


def test_merges_rebuild_every_token_from_two_lower_ranked_ones():
    from export.gguf_vocab import byte_to_unicode, gguf_vocab
    from gptfn.tokenizer import load_ranks

    ranks = load_ranks()
    back = {c: b for b, c in byte_to_unicode().items()}
    tokens, merges, types = gguf_vocab(50257)
    assert len(tokens) == len(types) == 50257 and len(merges) == 50000
    assert tokens[50256] == "<|endoftext|>" and types[50256] == 3 and set(types[:50256]) == {1}
    assert tokens[220] == "Ġ" and tokens[198] == "Ċ"  # b" " and b"\n" in GPT-2's spelling
    for i, merge in enumerate(merges):
        a, b = (bytes(back[c] for c in part) for part in merge.split(" "))
        assert ranks[a + b] == 256 + i and ranks[a] < 256 + i and ranks[b] < 256 + i
        assert tokens[256 + i] == merge.replace(" ", "")


def test_gguf_vocab_is_cut_or_padded_to_the_model():
    from export.gguf_vocab import NO_MERGE, gguf_vocab

    tokens, merges, types = gguf_vocab(300)
    assert len(tokens) == 300 and len(merges) == 44 and "<|endoftext|>" not in tokens
    tokens, merges, types = gguf_vocab(97)
    assert len(tokens) == 97 and merges == [NO_MERGE]
    tokens, merges, types = gguf_vocab(50304)
    assert tokens[50256] == "<|endoftext|>" and tokens[50303] == "[PAD50303]"
    assert types[50257:] == [5] * 47 and len(merges) == 50000


# --- GGUF in llama.cpp ----------------------------------------------------------------------


def _llama_probe(path: Path, n: int, text: str = TEXT) -> dict:
    r = subprocess.run([sys.executable, "-m", "tests.llama_probe", str(path), str(n), text],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _dequantized(path: Path) -> dict:
    """Every tensor of a GGUF file, read back with gguf's reader and dequantized."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    return {t.name: dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            for t in GGUFReader(path).tensors}


@needs_llama
@pytest.mark.parametrize("dtype, weight_error", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 1e-2),
                                                 ("q4_0", 0.13)])  # q4_0: 1/8 of a block's max
def test_gguf_runs_in_llama_cpp_as_gptfn(bpe_dir, tmp_path, dtype, weight_error):
    out = tmp_path / f"model-{dtype}.gguf"
    assert export("gguf", "--model", bpe_dir, "--out", out, "--dtype", dtype) == 0
    report = json.loads((tmp_path / f"model-{dtype}.gguf.report.json").read_text())
    assert report["tokenizer"]["checked"] and report["greedy"]["steps"] >= 16
    model = GPTModel.from_pretrained(bpe_dir).eval()

    # the file holds the model's weights in llama.cpp's layout, rounded as the dtype says
    tensors = _dequantized(out)
    for ours, theirs, transposed in [("wte.weight", "token_embd.weight", False),
                                     ("h.1.attn.c_attn.weight", "blk.1.attn_qkv.weight", True),
                                     ("h.0.mlp.c_proj.weight", "blk.0.ffn_down.weight", True),
                                     ("h.0.ln_2.bias", "blk.0.ffn_norm.bias", False)]:
        want = model.state_dict()[ours].numpy()
        want = want.T if transposed else want
        err = np.abs(tensors[theirs] - want).max() / np.abs(want).max()
        assert err <= weight_error, (theirs, err)
    assert "output.weight" not in tensors  # the head is tied: one copy of wte

    # llama.cpp's own tokenizer and generation loop, without gptfn in the process
    got = _llama_probe(out, 20)
    assert got["ids"] == BPETokenizer().encode_ordinary(TEXT)
    assert got["text"] == TEXT and got["n_vocab"] == 50257
    if dtype == "f32":
        with torch.no_grad():
            want = generate(model, torch.tensor([got["ids"]]), 20)[0, len(got["ids"]):]
        assert got["generated"] == want.tolist()


@needs_llama
def test_gguf_of_a_tiny_vocabulary_without_qkv_bias(tiny_dir, tmp_path):
    out = tmp_path / "tiny.gguf"
    assert export("gguf", "--model", tiny_dir, "--out", out) == 0
    report = json.loads((tmp_path / "tiny.gguf.report.json").read_text())
    assert report["greedy"]["tokens_equal"] and not report["tokenizer"]["checked"]
    assert not _dequantized(out)["blk.0.attn_qkv.bias"].any()  # the bias llama.cpp requires


@needs_llama
def test_gpt2_preset_exports_to_gguf_in_four_dtypes(tmp_path):
    from export.interop import build_gguf
    from gptfn.cli_args import load_model

    model = load_model("gpt2", True, 0, torch.float32, torch.device("cpu"))
    sizes = {}
    for dtype in ("f32", "f16", "q8_0", "q4_0"):
        out = tmp_path / f"gpt2-{dtype}.gguf"
        report = build_gguf(model, out, dtype, seed=0, threads=2, log=lambda m: None)
        assert report["greedy"]["steps"] >= 16 and report["tokenizer"]["checked"]
        assert report["greedy"]["tokens_equal"] or dtype != "f32"
        sizes[dtype] = out.stat().st_size
    # one copy of each weight (no separate head): 124M values at 4, 2, ~1.06 and ~0.56 bytes
    # (q8_0 and q4_0: 34 and 18 bytes a block of 32; the position embeddings stay float32)
    assert 490e6 < sizes["f32"] < 510e6 and 245e6 < sizes["f16"] < 265e6
    assert 130e6 < sizes["q8_0"] < 150e6 and 70e6 < sizes["q4_0"] < 80e6


@needs_llama
def test_a_file_llama_cpp_runs_differently_is_not_kept(bpe_dir, tmp_path, monkeypatch, capsys):
    import export.gguf_file as gguf_file

    monkeypatch.setattr(gguf_file, "_TRANSPOSED", ())  # weights in gptfn's layout: wrong here
    out = tmp_path / "wrong.gguf"
    assert export("gguf", "--model", bpe_dir, "--out", out) == 1
    assert "verification failed, nothing kept" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@needs_llama
def test_llama_cpp_batched_greedy_is_each_row_alone(tmp_path):
    from export.engines import Engine, EngineError

    # embeddings 30x GPT-2's scale: logits far apart, so each row's greedy tokens depend on
    # its own prompt and positions (a random model's flat logits give one token everywhere)
    cfg = tiny_config(context_length=40, qkv_bias=False)
    params = randomize_ln_and_biases(init_params(cfg, 5), 6)
    for key in ("wte.weight", "wpe.weight"):
        params[key] = params[key] * 30
    model = GPTModel(cfg, params=params).eval()
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "tiny.gguf"
    assert export("gguf", "--model", tmp_path / "model", "--out", out) == 0
    rows = torch.randint(0, model.config.vocab_size, (3, 12),
                         generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = generate(model, rows, 10)[:, 12:].tolist()  # gptfn, fp32
    assert len({tuple(r) for r in want}) == 3 and len(set(want[2])) > 1
    with Engine("llama.cpp", out, exact=True, n_ctx=model.config.context_length) as engine:
        got, stamps = engine.greedy_rows(rows.tolist(), 10)
        assert got == want and len(stamps) == 10
        assert [engine.greedy(r, 10)[0] for r in rows.tolist()] == want
        again, _ = engine.greedy_rows(rows[:2].tolist(), 10)  # a new batch shape: a new context
        assert again == want[:2]
        with pytest.raises(EngineError, match="prompts of one length"):
            engine.greedy_rows([[1, 2, 3], [4, 5]], 4)


def test_engine_error_names_the_file(tmp_path):
    from export.engines import Engine, EngineError

    if NO_LLAMA:
        pytest.skip(NO_LLAMA)
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(EngineError, match="cannot load .*not.gguf"):
        Engine("llama.cpp", bad)


# --- ONNX in ONNX Runtime -------------------------------------------------------------------


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_generate(session, config: dict, rows, n: int):
    """Greedy decoding of left-padded rows through the past, as optimum runs a decoder:
    positions from the attention mask, an empty past first. Returns (new ids, the first
    step's logits)."""
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows], dtype=np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
    heads, hs = config["n_head"], config["n_embd"] // config["n_head"]
    past = {f"past_key_values.{i}.{kv}": np.zeros((len(rows), heads, 0, hs), np.float32)
            for i in range(config["n_layer"]) for kv in ("key", "value")}
    names = [o.name for o in session.get_outputs()]
    out, first = [], None
    for _ in range(n):
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)[:, -ids.shape[1]:]
        logits, *presents = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                               "position_ids": positions, **past})
        first = logits if first is None else first
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        out.append(ids[:, 0])
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
        past = {"past_key_values." + k.split(".", 1)[1]: v for k, v in zip(names[1:], presents)}
    return np.stack(out, 1), first, mask


@needs_onnx
def test_onnx_runs_in_onnxruntime_as_gptfn_batched_and_padded(tiny_dir, tmp_path):
    out = tmp_path / "onnx"
    assert export("onnx", "--model", tiny_dir, "--out", out, "--int8") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.onnx", "model.onnx.report.json", "model_quantized.onnx"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_layer"] == 2
    session = _session(out / "model.onnx")
    assert [i.name for i in session.get_inputs()][:4] == [
        "input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    model = GPTModel.from_pretrained(tiny_dir).eval()
    rows = [[5, 17, 3, 88, 41, 9, 60], [12, 30, 7]]  # the second row left-padded by 4
    new, first, _ = _ort_generate(session, config, rows, 16)
    with torch.no_grad():
        for b, row in enumerate(rows):
            want = model(torch.tensor([row]))[0].numpy()
            np.testing.assert_allclose(first[b, -len(row):], want, atol=1e-4, rtol=0)
            want = generate(model, torch.tensor([row]), 16)[0, len(row):]
            assert new[b].tolist() == want.tolist()

    int8 = _session(out / "model_quantized.onnx")
    _, first8, _ = _ort_generate(int8, config, rows[:1], 1)
    with torch.no_grad():
        want = model(torch.tensor(rows[:1])).numpy()
    assert np.linalg.norm(first8 - want) / np.linalg.norm(want) < 0.15


@needs_onnx
def test_gpt2_preset_exports_to_onnx(tmp_path):
    from export.interop import build_onnx
    from gptfn.cli_args import load_model

    model = load_model("gpt2", True, 0, torch.float32, torch.device("cpu"))
    report = build_onnx(model, tmp_path / "gpt2", False, seed=0, threads=2, log=lambda m: None)
    check = report["checks"]["model.onnx"]
    assert check["greedy"]["tokens_equal"] and check["greedy"]["steps"] >= 16
    assert max(v["max_abs"] for part in check["logits"].values() for v in part.values()) <= 1e-4
    # one copy of the weights, inside model.onnx (under protobuf's 2 GB)
    assert 490e6 < (tmp_path / "gpt2" / "model.onnx").stat().st_size < 510e6


@needs_onnx
def test_onnx_export_never_writes_into_a_directory_of_other_files(tiny_dir, tmp_path, capsys):
    (tmp_path / "config.json").write_text("{\"mine\": true}")
    assert export("onnx", "--model", tiny_dir, "--out", tmp_path) == 2
    assert "holds no gptfn ONNX export" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert (tmp_path / "config.json").read_text() == "{\"mine\": true}"


@needs_onnx
def test_a_report_that_is_not_gptfns_does_not_open_a_directory(tiny_dir, tmp_path, capsys):
    (tmp_path / "model_quantized.onnx").write_bytes(b"the user's own model")
    (tmp_path / "model.onnx.report.json").write_text("my notes")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert export("onnx", "--model", tiny_dir, "--out", tmp_path) == 2
    assert "is not a report of the files beside it" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("kind", ["gguf", "onnx"])
def test_thread_counts_past_reason_are_refused_before_any_work(tiny_dir, tmp_path, capsys, kind):
    out = tmp_path / ("m.gguf" if kind == "gguf" else "m")
    assert export(kind, "--model", tiny_dir, "--out", out, "--threads", "100000") == 2
    assert "--threads must be in [1, " in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@needs_onnx
def test_onnx_export_replaces_its_own_earlier_export(tiny_dir, tmp_path):
    out = tmp_path / "onnx"
    assert export("onnx", "--model", tiny_dir, "--out", out, "--int8") == 0
    (out / ".gptfn-onnx-staging.abcd1234").mkdir()  # what a killed export leaves
    assert export("onnx", "--model", tiny_dir, "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.onnx", "model.onnx.report.json"]  # the int8 model went with it


# --- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["gguf", "--dtype", "q5_1"], "--dtype for gguf must be one of f32, f16, q8_0, q4_0"),
    (["gguf", "--max-seq-len", "20"], "--max-seq-len is for torch artifacts"),
    (["gguf", "--int8"], "--int8 is for onnx exports"),
    (["onnx", "--dtype", "bfloat16"], "--dtype for onnx must be float32"),
    (["torchscript", "--int8"], "--int8 is for onnx exports"),
])
def test_export_refuses_arguments_that_do_not_fit_the_kind(tiny_dir, tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "gptfn", "export", *args, "--model", str(tiny_dir),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("export: error: ")
    assert message in lines[0] and list(tmp_path.iterdir()) == []


@needs_llama
def test_gptfn_export_is_the_export_suite(tiny_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "gptfn", "export", "gguf", "--model", str(tiny_dir),
                        "--out", str(tmp_path / "m.gguf")], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "verified and written" in r.stdout and (tmp_path / "m.gguf").is_file()
    help_text = subprocess.run([sys.executable, "-m", "gptfn", "export", "--help"],
                               capture_output=True, text=True).stdout
    assert help_text.startswith("usage: gptfn export") and "gguf" in help_text
