"""The loading boundary: checkpoints in, canonical params out (and back)."""

from gptfn.weights.hub import canonicalize, load_params, save_params
from gptfn.weights.safetensors_io import SafetensorsError, load_safetensors, save_safetensors

__all__ = [
    "SafetensorsError",
    "canonicalize",
    "load_params",
    "load_safetensors",
    "save_params",
    "save_safetensors",
]
