"""GGUF: GPT-2 as llama.cpp's ``gpt2`` architecture, written with the ``gguf`` package.

The tensors are the checkpoint's, renamed to llama.cpp's names; the Conv1D ``[in, out]``
weights are transposed to ``[out, in]`` (ggml's row-major ``ne = {in, out}``), as llama.cpp's
own converter does. The output head is tied: the file has no ``output.weight``, and llama.cpp
then multiplies by ``token_embd.weight`` (one copy of the largest matrix). The tokenizer is
GPT-2's byte-level BPE (``export.gguf_vocab``).

Precisions (``--dtype``), as llama.cpp's converter writes them: ``f32``; ``f16`` (2-D
weights in float16); ``q8_0`` (2-D weights in blocks of 32 int8 values with one float16
scale, quantized by ``gguf.quants``). And ``q4_0``, as ``llama-quantize --pure`` writes it
(the converter has no 4-bit type): 2-D weights in blocks of 32 4-bit values with one float16
scale, ``gguf.quants``' Q4_0, the tied ``token_embd`` included. Plain ``llama-quantize
model-f16.gguf q4_0`` would keep the tied head at Q6_K, which ``gguf.quants`` cannot write;
all-Q4_0 is also what gptfn's ``int4`` format stores, which the benchmarks hold it against.
In q8_0 and q4_0 a matrix whose rows are not a multiple of 32 long falls back to f16. Norms
and biases (1-D) and the position embeddings stay float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, Tuple

import numpy as np
import torch
from torch import Tensor

from gptfn.config import GPTConfig

DTYPES = ("f32", "f16", "q8_0", "q4_0")
ARCH = "gpt2"
_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
          "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def import_gguf():
    """The ``gguf`` package, or an ImportError that says how to install it."""
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install -e '.[interop]' "
                          "(or pip install gguf)") from None
    return gguf


def gguf_tensors(config: GPTConfig, params: Dict[str, Tensor]) -> Iterator[Tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array in ggml's layout) for every tensor the file holds."""
    def array(t: Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float32).contiguous().numpy()

    yield "token_embd.weight", array(params["wte.weight"])  # (V, C)
    yield "position_embd.weight", array(params["wpe.weight"])  # (T_max, C)
    for i in range(config.num_layers):
        for ours, theirs in _BLOCK.items():
            w = params[f"h.{i}.{ours}.weight"]
            if f"{ours}.weight" in _TRANSPOSED:
                w = w.t()  # (in, out) -> (out, in)
            yield f"blk.{i}.{theirs}.weight", array(w)
            bias = params.get(f"h.{i}.{ours}.bias")
            if bias is None:  # qkv_bias=False: llama.cpp's gpt2 graph requires the tensor
                bias = torch.zeros(w.shape[0])  # (out,)
            yield f"blk.{i}.{theirs}.bias", array(bias)
    yield "output_norm.weight", array(params["ln_f.weight"])
    yield "output_norm.bias", array(params["ln_f.bias"])


def tensor_type(gguf, name: str, data: np.ndarray, dtype: str):
    """The ggml type ``name`` is stored in at file precision ``dtype``."""
    t = gguf.GGMLQuantizationType
    if dtype == "f32" or data.ndim == 1 or name == "position_embd.weight":
        return t.F32
    quantized = {"q8_0": t.Q8_0, "q4_0": t.Q4_0}.get(dtype)
    if quantized is not None and data.shape[-1] % gguf.GGML_QUANT_SIZES[quantized][0] == 0:
        return quantized
    return t.F16


def write_gguf(path: Path, config: GPTConfig, params: Dict[str, Tensor], dtype: str,
               name: str = "gpt2") -> Dict[str, str]:
    """Write the model as a GGUF file at ``path`` (created or truncated). Returns the ggml
    type of each tensor by name."""
    from export.gguf_vocab import ENDOFTEXT_ID, gguf_vocab

    if dtype not in DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    gguf = import_gguf()
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    writer = gguf.GGUFWriter(path, ARCH)
    try:
        writer.add_name(name)
        writer.add_context_length(config.context_length)
        writer.add_embedding_length(config.embed_dim)
        writer.add_feed_forward_length(4 * config.embed_dim)
        writer.add_block_count(config.num_layers)
        writer.add_head_count(config.num_heads)
        writer.add_layer_norm_eps(config.layer_norm_eps)
        writer.add_file_type(file_type)
        tokens, merges, types = gguf_vocab(config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        if config.vocab_size > ENDOFTEXT_ID:
            writer.add_bos_token_id(ENDOFTEXT_ID)
            writer.add_eos_token_id(ENDOFTEXT_ID)
        writer.add_add_bos_token(False)  # GPT-2 takes text as it is
        types_by_name = {}
        for tensor_name, data in gguf_tensors(config, params):
            qtype = tensor_type(gguf, tensor_name, data, dtype)
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            types_by_name[tensor_name] = qtype.name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return types_by_name
