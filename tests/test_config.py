import dataclasses

import pytest

from gptfn import GPTConfig, PRESETS

ORIGINAL_124M = {
    "vocab_size": 50257,
    "embed_dim": 768,
    "context_length": 1024,
    "num_layers": 12,
    "num_heads": 12,
    "dropout_rate": 0.1,
    "qkv_bias": True,
}


@pytest.mark.parametrize(
    "name, width, layers, heads",
    [
        ("gpt2", 768, 12, 12),
        ("gpt2-medium", 1024, 24, 16),
        ("gpt2-large", 1280, 36, 20),
        ("gpt2-xl", 1600, 48, 25),
    ],
)
def test_presets(name, width, layers, heads):
    cfg = GPTConfig.from_preset(name)
    assert (cfg.embed_dim, cfg.num_layers, cfg.num_heads) == (width, layers, heads)
    assert (cfg.vocab_size, cfg.context_length, cfg.qkv_bias) == (50257, 1024, True)
    assert cfg.layer_norm_eps == 1e-5


@pytest.mark.parametrize("alias, name", [("124M", "gpt2"), ("355M", "gpt2-medium"),
                                         ("774M", "gpt2-large"), ("1558M", "gpt2-xl")])
def test_preset_aliases(alias, name):
    assert GPTConfig.from_preset(alias) == PRESETS[name]


def test_original_dict_reads_exactly():
    cfg = GPTConfig.from_dict(ORIGINAL_124M)
    assert cfg == GPTConfig.from_preset("gpt2")
    assert cfg.to_dict()["embed_dim"] == 768


def test_frozen():
    cfg = GPTConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.embed_dim = 10


def test_hf_config_names():
    hf = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "activation_function": "gelu_new", "n_embd": 64, "n_layer": 3, "n_head": 4,
        "n_positions": 128, "n_ctx": 128, "vocab_size": 500, "layer_norm_epsilon": 1e-6,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "n_inner": None,
        "summary_type": "cls_index", "transformers_version": "4.0", "tie_word_embeddings": True,
    }
    cfg = GPTConfig.from_dict(hf)
    assert cfg == GPTConfig(vocab_size=500, context_length=128, embed_dim=64, num_layers=3,
                            num_heads=4, dropout_rate=0.0, layer_norm_eps=1e-6)
    # and back: to_hf_dict reads to the same config
    assert GPTConfig.from_dict(cfg.to_hf_dict()) == cfg


def test_openai_hparams_names():
    hparams = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1024, "n_head": 16, "n_layer": 24}
    assert GPTConfig.from_dict(hparams) == dataclasses.replace(
        GPTConfig.from_preset("gpt2-medium"), dropout_rate=0.1
    )


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"embed_dim": 10, "num_heads": 3}, "embed_dim"),
        ({"num_layers": 0}, "num_layers"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"context_length": 0}, "context_length"),
        ({"num_heads": 0}, "num_heads"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"dropout_rate": -0.1}, "dropout_rate"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"embed_dim": 7.5}, "embed_dim"),
        ({"qkv_bias": "yes"}, "qkv_bias"),
    ],
)
def test_invalid_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig.from_dict({**ORIGINAL_124M, **bad})


def test_unknown_key_named():
    with pytest.raises(ValueError, match="emb_dimm"):
        GPTConfig.from_dict({**ORIGINAL_124M, "emb_dimm": 768})


def test_unknown_preset_named():
    with pytest.raises(ValueError, match="gpt3"):
        GPTConfig.from_preset("gpt3")


def test_conflicting_spellings():
    with pytest.raises(ValueError, match="embed_dim"):
        GPTConfig.from_dict({"n_embd": 64, "embed_dim": 32, "num_heads": 4})


@pytest.mark.parametrize("key, value", [("activation_function", "relu"),
                                        ("tie_word_embeddings", False),
                                        ("scale_attn_by_inverse_layer_idx", True)])
def test_unsupported_hf_variants_rejected(key, value):
    with pytest.raises(ValueError, match=key):
        GPTConfig.from_dict({"n_embd": 64, "n_head": 4, key: value})


def test_from_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        GPTConfig.from_json(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        GPTConfig.from_json(tmp_path / "missing.json")
