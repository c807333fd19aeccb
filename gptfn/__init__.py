"""gptfn: GPT-2 as a pure function of a flat parameter dict, with thin scriptable modules."""

from gptfn import functional
from gptfn.config import PRESETS, GPTConfig
from gptfn.functional import gpt_forward
from gptfn.modules import (
    GELU,
    CausalAttention,
    FeedForward,
    GPTModel,
    LayerNorm,
    MultiHeadAttention,
    SelfAttention,
    TransformerBlock,
)
from gptfn.params import init_params, num_params, param_shapes, validate_params
from gptfn.weights import load_params, save_params

__version__ = "0.1.0"

__all__ = [
    "GELU",
    "PRESETS",
    "CausalAttention",
    "FeedForward",
    "GPTConfig",
    "GPTModel",
    "LayerNorm",
    "MultiHeadAttention",
    "SelfAttention",
    "TransformerBlock",
    "functional",
    "gpt_forward",
    "init_params",
    "load_params",
    "num_params",
    "param_shapes",
    "save_params",
    "validate_params",
]
