"""gptfn: GPT-2 as a pure function of a flat parameter dict, with thin scriptable modules.

Public names are imported on first use, so that ``import gptfn`` (and the tokenizer and
``gptfn prepare``, which need no torch) stay light; ``from gptfn import GPTModel`` works
as usual.
"""

import importlib
from typing import Any, List

__version__ = "0.1.0"

_EXPORTS = {
    "GPTConfig": "gptfn.config",
    "PRESETS": "gptfn.config",
    "gpt_forward": "gptfn.functional",
    "GELU": "gptfn.modules",
    "CausalAttention": "gptfn.modules",
    "FeedForward": "gptfn.modules",
    "GPTModel": "gptfn.modules",
    "GPTModelV1": "gptfn.modules",  # GPTModelV1, BPE_Tokenizer: aliases
    "LayerNorm": "gptfn.modules",
    "MultiHeadAttention": "gptfn.modules",
    "SelfAttention": "gptfn.modules",
    "TransformerBlock": "gptfn.modules",
    "init_params": "gptfn.params",
    "num_params": "gptfn.params",
    "param_shapes": "gptfn.params",
    "validate_params": "gptfn.params",
    "load_params": "gptfn.weights",
    "save_params": "gptfn.weights",
    "BPETokenizer": "gptfn.tokenizer",
    "BPE_Tokenizer": "gptfn.tokenizer",
    "TextDataset": "gptfn.data",
    "TextDataLoader": "gptfn.data",
    "TokenFileDataset": "gptfn.data",
    "train_val_split": "gptfn.data",
    "KVCache": "gptfn.kv_cache",
    "download": "gptfn.weights.download",
    "TrainSettings": "gptfn.train",
    "evaluate": "gptfn.train",
    "generate": "gptfn.generation",
    "stream": "gptfn.generation",
    "left_pad": "gptfn.generation",
    "quantize": "gptfn.quantization",
    "huge_pages": "gptfn.hugepages",
}
_SUBMODULES = ("functional",)

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f"gptfn.{name}")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'gptfn' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
