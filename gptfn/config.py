"""GPTConfig: the model's hyperparameters, with GPT-2's named presets.

The config is a frozen dataclass of plain ints, floats and bools. It reads three
spellings of the same facts:

- the GPTModelV1 API's dict (``embed_dim``, ``num_layers``, ``drop_rate`` ...),
- HF transformers' ``config.json`` (``n_embd``, ``n_layer``, ``n_positions`` ...),
- OpenAI's ``hparams.json`` (``n_vocab``, ``n_ctx``, ``n_embd``, ``n_head``, ``n_layer``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Union

from gptfn.checks import is_int, is_number


@dataclass(frozen=True)
class GPTConfig:
    """GPT-2 hyperparameters. Defaults are the 124M model's."""

    vocab_size: int = 50257
    context_length: int = 1024
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    dropout_rate: float = 0.1
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "embed_dim", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not is_int(value):
                raise ValueError(f"GPTConfig.{name} must be an int, got {value!r}")
            if value <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {value}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"GPTConfig.embed_dim ({self.embed_dim}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if not is_number(self.dropout_rate):
            raise ValueError(f"GPTConfig.dropout_rate must be a float, got {self.dropout_rate!r}")
        if not 0.0 <= float(self.dropout_rate) < 1.0:
            raise ValueError(f"GPTConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"GPTConfig.qkv_bias must be a bool, got {self.qkv_bias!r}")
        eps = self.layer_norm_eps
        if not is_number(eps) or not (
            math.isfinite(eps) and eps > 0
        ):
            raise ValueError(f"GPTConfig.layer_norm_eps must be a positive float, got {eps!r}")
        # Store floats as floats so TorchScript wrappers see one type.
        object.__setattr__(self, "dropout_rate", float(self.dropout_rate))
        object.__setattr__(self, "layer_norm_eps", float(eps))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """One of ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` (or 124M ... 1558M)."""
        key = preset_name(name)
        return dataclasses.replace(PRESETS[key], **overrides) if overrides else PRESETS[key]

    # ------------------------------------------------------------ dict formats
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPTConfig":
        """Build from the GPTModelV1 API's dict, an HF config.json or an OpenAI hparams.json.

        Every key must be known: a misspelt key raises ValueError naming it, rather than
        silently keeping a default. HF keys that do not change the math (architectures,
        bos_token_id, ...) are accepted and ignored.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"config must be a mapping, got {type(d).__name__}")
        fields: Dict[str, Any] = {}
        for key, value in d.items():
            if key in _ALIASES:
                field = _ALIASES[key]
                if field in fields and fields[field] != value:
                    raise ValueError(
                        f"config gives {field} twice with different values "
                        f"(key {key!r}: {value!r} vs {fields[field]!r})"
                    )
                fields[field] = value
            elif key in _HF_CHECKED:
                _HF_CHECKED[key](value)
            elif key in _HF_IGNORED or key.startswith(("task_specific", "summary_")):
                continue
            else:
                raise ValueError(f"unknown config key {key!r}")
        return cls(**fields)

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "GPTConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> Dict[str, Any]:
        """The GPTModelV1 API's field names."""
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> Dict[str, Any]:
        """A config.json that HF transformers' GPT2LMHeadModel.from_pretrained reads."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "vocab_size": self.vocab_size,
            "n_positions": self.context_length,
            "n_ctx": self.context_length,
            "n_embd": self.embed_dim,
            "n_layer": self.num_layers,
            "n_head": self.num_heads,
            "resid_pdrop": self.dropout_rate,
            "embd_pdrop": self.dropout_rate,
            "attn_pdrop": self.dropout_rate,
            "layer_norm_epsilon": self.layer_norm_eps,
            "initializer_range": 0.02,
            "bos_token_id": min(50256, self.vocab_size - 1),  # <|endoftext|>
            "eos_token_id": min(50256, self.vocab_size - 1),
            "qkv_bias": self.qkv_bias,
            "tie_word_embeddings": True,
        }


def _check_gelu_new(value: Any) -> None:
    if value not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"activation_function {value!r} is not supported: gptfn computes GPT-2's "
            "tanh-approximated GELU ('gelu_new')"
        )


def _check_tied(value: Any) -> None:
    if value is not True:
        raise ValueError("tie_word_embeddings must be true: gptfn ties the output head to wte")


def _check_no_scaling_changes(key: str, expected: Any):
    def check(value: Any) -> None:
        if value != expected:
            raise ValueError(f"config key {key}={value!r} is not supported (gptfn needs "
                             f"{expected!r})")

    return check


# Every spelling of each field: the GPTModelV1 API's, HF's and OpenAI's.
_ALIASES: Dict[str, str] = {
    "vocab_size": "vocab_size",
    "n_vocab": "vocab_size",
    "context_length": "context_length",
    "n_positions": "context_length",
    "n_ctx": "context_length",
    "embed_dim": "embed_dim",
    "emb_dim": "embed_dim",
    "n_embd": "embed_dim",
    "num_layers": "num_layers",
    "n_layers": "num_layers",
    "n_layer": "num_layers",
    "num_heads": "num_heads",
    "n_heads": "num_heads",
    "n_head": "num_heads",
    "dropout_rate": "dropout_rate",
    "drop_rate": "dropout_rate",
    "resid_pdrop": "dropout_rate",
    "embd_pdrop": "dropout_rate",
    "attn_pdrop": "dropout_rate",
    "qkv_bias": "qkv_bias",
    "layer_norm_eps": "layer_norm_eps",
    "layer_norm_epsilon": "layer_norm_eps",
}

# HF keys whose value must agree with gptfn's fixed choices.
_HF_CHECKED = {
    "activation_function": _check_gelu_new,
    "tie_word_embeddings": _check_tied,
    "scale_attn_weights": _check_no_scaling_changes("scale_attn_weights", True),
    "scale_attn_by_inverse_layer_idx": _check_no_scaling_changes(
        "scale_attn_by_inverse_layer_idx", False
    ),
    "reorder_and_upcast_attn": _check_no_scaling_changes("reorder_and_upcast_attn", False),
    "add_cross_attention": _check_no_scaling_changes("add_cross_attention", False),
    "n_inner": _check_no_scaling_changes("n_inner", None),
    "n_special": _check_no_scaling_changes("n_special", 0),  # the hub's gpt2-medium states 0
}

# HF keys that do not change the forward pass.
_HF_IGNORED = frozenset(
    {
        "gptfn_save_id",  # pairs config.json with its model.safetensors (gptfn.weights.hub)
        "quantization",  # the weight format, checked against the weights (gptfn.weights.hub)
        "predict_special_tokens",  # the hub's gpt2-medium config.json; no effect on the math
        "architectures",
        "model_type",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "use_cache",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "_name_or_path",
        "output_past",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "is_decoder",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
    }
)

PRESETS: Dict[str, GPTConfig] = {
    "gpt2": GPTConfig(embed_dim=768, num_layers=12, num_heads=12),
    "gpt2-medium": GPTConfig(embed_dim=1024, num_layers=24, num_heads=16),
    "gpt2-large": GPTConfig(embed_dim=1280, num_layers=36, num_heads=20),
    "gpt2-xl": GPTConfig(embed_dim=1600, num_layers=48, num_heads=25),
}

PRESET_ALIASES: Dict[str, str] = {
    "124M": "gpt2",
    "355M": "gpt2-medium",
    "774M": "gpt2-large",
    "1558M": "gpt2-xl",
}

MODEL_NAMES = tuple(PRESETS) + tuple(PRESET_ALIASES)


def preset_name(name: str) -> str:
    """The preset a model name means (``"124M"`` -> ``"gpt2"``): the one place that knows
    the names, and the one error for a name that is none of them."""
    key = PRESET_ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in PRESETS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(MODEL_NAMES)}")
    return key


def resolve_config(config: Union[GPTConfig, Mapping[str, Any], str]) -> GPTConfig:
    """A GPTConfig from a GPTConfig, a dict (any of the three spellings) or a preset name."""
    if isinstance(config, GPTConfig):
        return config
    if isinstance(config, str):
        return GPTConfig.from_preset(config)
    if isinstance(config, Mapping):
        return GPTConfig.from_dict(config)
    raise ValueError(
        f"config must be a GPTConfig, a dict or a preset name, got {type(config).__name__}"
    )
