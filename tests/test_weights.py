"""Weights I/O: safetensors in the hub layout, parity with HF transformers, bad files."""

import json
import os
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gptfn
from gptfn import GPTModel, gpt_forward, init_params, load_params, save_params
from gptfn.weights import SafetensorsError, save_safetensors
from tests.helpers import hf_logits, hf_model, random_idx, randomize_ln_and_biases, tiny_config

transformers = pytest.importorskip("transformers")


PARITY_CONFIGS = [
    dict(num_heads=4, num_layers=2),
    dict(num_heads=1, num_layers=1),
    dict(num_heads=8, num_layers=3, embed_dim=64),
    dict(num_heads=2, num_layers=2, vocab_size=301, context_length=64),
]


@pytest.mark.parametrize("overrides", PARITY_CONFIGS)
def test_hf_save_pretrained_loads_with_equal_logits(tmp_path, overrides):
    cfg = tiny_config(**overrides)
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path)
    loaded_cfg, params = load_params(tmp_path)
    assert loaded_cfg == cfg
    for length in (1, 7, cfg.context_length):
        idx = random_idx(cfg, 2, length, seed=length)
        diff = (gpt_forward(params, idx, loaded_cfg) - hf_logits(hf, idx)).abs().max().item()
        assert diff <= 1e-4, (length, diff)


@pytest.mark.parametrize("overrides", PARITY_CONFIGS)
def test_save_params_loads_in_hf_with_equal_logits(tmp_path, overrides):
    cfg = tiny_config(**overrides)
    params = randomize_ln_and_biases(init_params(cfg, seed=3))
    save_params(params, tmp_path, cfg)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    for length in (1, 11, cfg.context_length):
        idx = random_idx(cfg, 3, length, seed=length)
        diff = (gpt_forward(params, idx, cfg) - hf_logits(hf, idx)).abs().max().item()
        assert diff <= 1e-4, (length, diff)


def test_no_qkv_bias_equals_hf_with_zero_qkv_bias():
    cfg = tiny_config(qkv_bias=False)
    params = randomize_ln_and_biases(init_params(cfg, seed=5))
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_hf_dict())).eval()
    state = dict(params)
    for i in range(cfg.num_layers):
        state[f"h.{i}.attn.c_attn.bias"] = torch.zeros(3 * cfg.embed_dim)
    missing, unexpected = hf.transformer.load_state_dict(state, strict=False)
    assert not unexpected and all(".attn.bias" in k or "masked_bias" in k for k in missing)
    idx = random_idx(cfg, 2, 20)
    assert (gpt_forward(params, idx, cfg) - hf_logits(hf, idx)).abs().max() <= 1e-4


def test_hub_key_style_with_mask_buffers(tmp_path):
    """The real hub file: no `transformer.` prefix, `h.N.attn.bias` mask buffers."""
    cfg = tiny_config()
    hf = hf_model(cfg, seed=1)
    tensors = {k[len("transformer."):]: v.contiguous() for k, v in hf.state_dict().items()
               if k.startswith("transformer.")}
    t_max = cfg.context_length
    for i in range(cfg.num_layers):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(t_max, t_max)).view(1, 1, t_max, t_max)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_safetensors(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    loaded_cfg, params = load_params(tmp_path / "model.safetensors")
    assert set(params) == set(gptfn.param_shapes(cfg))
    idx = random_idx(cfg, 2, 13)
    assert (gpt_forward(params, idx, loaded_cfg) - hf_logits(hf, idx)).abs().max() <= 1e-4


def test_tied_lm_head_dropped_untied_rejected(tmp_path):
    cfg = tiny_config()
    params = init_params(cfg)
    tensors = {"transformer." + k: v for k, v in params.items()}
    tensors["lm_head.weight"] = params["wte.weight"].clone()
    save_safetensors(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    _, loaded = load_params(tmp_path)
    assert "lm_head.weight" not in loaded
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_safetensors(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_params(tmp_path)


@given(
    cfg=st.builds(tiny_config, num_layers=st.integers(1, 2), qkv_bias=st.booleans()),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 100),
)
def test_save_load_is_bit_exact(tmp_path_factory, cfg, dtype, seed):
    path = tmp_path_factory.mktemp("rt")
    params = init_params(cfg, seed, dtype=dtype)
    save_params(params, path, cfg)
    loaded_cfg, loaded = load_params(path)
    assert loaded_cfg == cfg
    assert set(loaded) == set(params)
    for k, v in params.items():
        assert loaded[k].dtype == dtype
        assert torch.equal(loaded[k], v), k


def _mapped_files():
    spans = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            spans.append((lo, hi, parts[-1] if len(parts) >= 6 else ""))
    return spans


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
def test_fp32_load_is_memory_mapped_copy_on_write(tmp_path):
    cfg = tiny_config()
    save_params(init_params(cfg), tmp_path, cfg)
    weights = str((tmp_path / "model.safetensors").resolve())
    _, params = load_params(tmp_path)
    spans = _mapped_files()
    for key, t in params.items():
        ptr = t.data_ptr()
        assert any(lo <= ptr < hi and name == weights for lo, hi, name in spans), key
    before = (tmp_path / "model.safetensors").read_bytes()
    params["wte.weight"].add_(1.0)  # a private copy of the page changes, never the file
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_dtype_and_device_convert(tmp_path):
    cfg = tiny_config()
    params = init_params(cfg)
    save_params(params, tmp_path, cfg)
    _, half = load_params(tmp_path, dtype=torch.float16, device="cpu")
    assert all(t.dtype == torch.float16 for t in half.values())
    torch.testing.assert_close(half["wte.weight"].float(), params["wte.weight"], atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="dtype"):
        load_params(tmp_path, dtype=torch.int32)


def test_module_from_pretrained_save_pretrained(tmp_path):
    cfg = tiny_config()
    model = GPTModel(cfg, seed=4).eval()
    out = model.save_pretrained(tmp_path / "run")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    again = GPTModel.from_pretrained(tmp_path / "run")
    assert not again.training
    idx = random_idx(cfg, 2, 9)
    torch.testing.assert_close(again(idx), model(idx), atol=0, rtol=0)


# ----------------------------------------------------------------- bad files


@pytest.fixture
def saved(tmp_path):
    cfg = tiny_config()
    save_params(init_params(cfg), tmp_path, cfg)
    return cfg, tmp_path, tmp_path / "model.safetensors"


def test_truncated_file(saved):
    _, d, f = saved
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(SafetensorsError, match="truncated"):
        load_params(d)


def test_not_a_safetensors_file(saved):
    _, d, f = saved
    f.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 10)
    with pytest.raises(SafetensorsError, match="not a safetensors file"):
        load_params(d)
    f.write_bytes(b"abc")
    with pytest.raises(SafetensorsError, match="too short"):
        load_params(d)


def _rewrite_header(f, edit):
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_header_lies_about_shape(saved):
    _, d, f = saved
    _rewrite_header(f, lambda h: h["ln_f.bias"].__setitem__("shape", [33]))
    with pytest.raises(SafetensorsError, match="'ln_f.bias'.*needs 132 bytes"):
        load_params(d)


def test_header_lies_about_offsets(saved):
    _, d, f = saved

    def grow(h):
        key = "wte.weight"
        begin, end = h[key]["data_offsets"]
        h[key]["data_offsets"] = [begin, end + 10**9]
        h[key]["shape"] = [h[key]["shape"][0] + 10**9 // 128, 32]

    _rewrite_header(f, grow)
    with pytest.raises(SafetensorsError, match="wte.weight"):
        load_params(d)


def test_header_length_beyond_file(saved):
    _, d, f = saved
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    with pytest.raises(SafetensorsError, match="header length"):
        load_params(d)


def test_wrong_shape_named(tmp_path):
    cfg = tiny_config()
    params = init_params(cfg)
    params["h.1.attn.c_proj.weight"] = torch.zeros(32, 16)
    save_safetensors(params, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    with pytest.raises(ValueError, match=r"h.1.attn.c_proj.weight: expected shape \[32, 32\], got \[32, 16\]"):
        load_params(tmp_path)


def test_missing_key_named(tmp_path):
    cfg = tiny_config()
    params = init_params(cfg)
    del params["ln_f.weight"]
    save_safetensors(params, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    with pytest.raises(ValueError, match="missing keys: ln_f.weight"):
        load_params(tmp_path)


def test_config_that_does_not_match_tensors(saved):
    cfg, d, _ = saved
    (d / "config.json").write_text(json.dumps(tiny_config(num_layers=3, vocab_size=50).to_hf_dict()))
    with pytest.raises(ValueError, match=r"missing keys: h.2.*wte.weight: expected shape \[50, 32\]"):
        load_params(d)


def test_missing_config_json(saved):
    _, d, f = saved
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_params(f)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_params(d / "nothing.safetensors")


def test_crash_mid_save_keeps_previous_file(saved, monkeypatch):
    import gptfn.weights.hub as hub

    cfg, d, f = saved
    before = f.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(hub, "write_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        save_params(init_params(cfg, seed=9), d, cfg)
    assert f.read_bytes() == before
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]  # no temp file left


def test_save_rejects_bad_params_before_writing(tmp_path):
    cfg = tiny_config()
    params = init_params(cfg)
    del params["wpe.weight"]
    with pytest.raises(ValueError, match="wpe.weight"):
        save_params(params, tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()



def test_loaders_return_params_and_never_import_the_modules():
    """The layering: modules call loaders, never the reverse (no import circle). No module
    of gptfn.weights imports gptfn.modules, at its top or inside a function."""
    import ast
    from pathlib import Path

    for path in sorted(Path(gptfn.weights.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith(("gptfn.modules", "gptfn.GPTModel")) for n in names), \
                f"{path.name}:{node.lineno} imports {names}"
