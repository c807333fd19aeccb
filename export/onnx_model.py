"""ONNX: a GPT-2 decoder with KV cache in HF optimum's ``text-generation-with-past`` layout.

Inputs: ``input_ids``, ``attention_mask``, ``position_ids`` (int64; (B, T), (B, P+T), (B, T)),
``past_key_values.{i}.key`` / ``.value`` (B, nh, P, hs). Outputs: ``logits`` (B, T, V),
``present.{i}.key`` / ``.value`` (B, nh, P+T, hs): the past with this call's keys appended.
Batch, sequence and past lengths are dynamic, the past may be empty (P = 0), so one model
serves the prompt and every step after it, as optimum's ``ORTModelForCausalLM`` and a
hand-written ONNX Runtime loop run it.

``attention_mask`` marks the real tokens of the past and the new tokens (1) and padding (0).
A token attends to the real tokens at or before its own slot; a padding token to itself
only, so that its (unused) output stays finite.

Built by torch's ONNX exporter (``torch.onnx.export``, dynamo) from the functional core's
pieces (``embed``, ``linear``, ``split_heads``, ``feed_forward``, ``lm_head``), over one
parameter dict, as every other gptfn artifact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptfn.config import GPTConfig
from gptfn.functional.attention import merge_heads, split_heads
from gptfn.functional.layers import feed_forward, linear
from gptfn.functional.model import embed, lm_head

MODEL_FILE = "model.onnx"
INT8_FILE = "model_quantized.onnx"  # the name optimum's quantizer gives
OPSET = 18


def hf_config(config: GPTConfig) -> str:
    """The ``config.json`` beside the model: HF's GPT-2 config, which optimum reads."""
    return json.dumps({**config.to_hf_dict(), "use_cache": True}, indent=2) + "\n"


def input_names(num_layers: int) -> List[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def output_names(num_layers: int) -> List[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def past_mask(attention_mask: Tensor, past: int, t: int) -> Tensor:
    """Which of the P + T slots each new token attends to.

    Shapes: attention_mask (B, P+T) -> (B, 1, T, P+T) bool.
    """
    total = attention_mask.size(1)
    j = torch.arange(total, device=attention_mask.device)  # (P+T,)
    s = torch.arange(t, device=attention_mask.device).view(-1, 1) + past  # (T, 1)
    causal = j.view(1, -1) <= s  # (T, P+T)
    itself = j.view(1, -1) == s  # (T, P+T)
    real = attention_mask.bool().view(-1, 1, 1, total)  # (B, 1, 1, P+T)
    return causal.view(1, 1, t, total) & (real | itself.view(1, 1, t, total))  # (B, 1, T, P+T)


class OnnxDecoder(nn.Module):
    """GPT-2 with the past keys and values as inputs and the present ones as outputs."""

    def __init__(self, config: GPTConfig, params: Dict[str, Tensor]):
        super().__init__()
        self.config = config
        for i, (k, v) in enumerate(params.items()):
            self.register_buffer(f"p{i}", v.detach().float().contiguous())
        self.keys_order = list(params)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past_key_values: Tuple[Tensor, ...]):
        """Shapes: input_ids, position_ids (B, T), attention_mask (B, P+T), past_key_values
        2L x (B, nh, P, hs) -> logits (B, T, V), 2L x (B, nh, P+T, hs)."""
        cfg = self.config
        p = {k: getattr(self, f"p{i}") for i, k in enumerate(self.keys_order)}
        past = past_key_values[0].size(2)
        t = input_ids.size(1)
        mask = past_mask(attention_mask, past, t)  # (B, 1, T, P+T)
        x = embed(input_ids, position_ids, p["wte.weight"], p["wpe.weight"])  # (B, T, C)
        presents: List[Tensor] = []
        for i in range(cfg.num_layers):
            pre = f"h.{i}."
            h = F.layer_norm(x, [cfg.embed_dim], p[pre + "ln_1.weight"], p[pre + "ln_1.bias"],
                             cfg.layer_norm_eps)  # (B, T, C)
            qkv = linear(h, p[pre + "attn.c_attn.weight"], p.get(pre + "attn.c_attn.bias"))
            q, k, v = qkv.chunk(3, dim=-1)  # 3 x (B, T, C)
            q = split_heads(q, cfg.num_heads)  # (B, T, C) -> (B, nh, T, hs)
            k = split_heads(k, cfg.num_heads)  # (B, T, C) -> (B, nh, T, hs)
            v = split_heads(v, cfg.num_heads)
            k = torch.cat([past_key_values[2 * i], k], 2)  # (B, nh, P+T, hs)
            v = torch.cat([past_key_values[2 * i + 1], v], 2)
            presents += [k, v]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
            y = linear(merge_heads(y), p[pre + "attn.c_proj.weight"], p[pre + "attn.c_proj.bias"])
            x = x + y
            h = F.layer_norm(x, [cfg.embed_dim], p[pre + "ln_2.weight"], p[pre + "ln_2.bias"],
                             cfg.layer_norm_eps)
            x = x + feed_forward(h, p[pre + "mlp.c_fc.weight"], p[pre + "mlp.c_fc.bias"],
                                 p[pre + "mlp.c_proj.weight"], p[pre + "mlp.c_proj.bias"])
        logits = lm_head(x, p["ln_f.weight"], p["ln_f.bias"], p["wte.weight"],
                         cfg.layer_norm_eps)  # (B, T, V)
        return (logits, *presents)


@contextlib.contextmanager
def _exporter_notes_quiet():
    """The exporter's notes about torch's own internals, which a caller can do nothing
    about: that torchvision's ops are not registered (gptfn uses none), a pytree API torch
    deprecates, and that two names for one dynamic axis collapse into one. Exactly those."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used",
                                    category=UserWarning)
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`",
                                    category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def export_onnx(config: GPTConfig, params: Dict[str, Tensor], path: Path) -> None:
    """Write the decoder to ``path`` (its weights inside, or beside it as ``NAME.data``
    where the model passes protobuf's 2 GB)."""
    from torch.export import Dim

    if config.context_length < 4:
        raise ValueError(f"ONNX export needs a context of at least 4 positions (its trace "
                         f"takes 2 past and 2 new tokens), got {config.context_length}")
    module = OnnxDecoder(config, params).eval()
    n = config.num_layers
    batch = Dim("batch", min=1, max=1024)
    seq = Dim("sequence_length", min=1, max=config.context_length)
    past = Dim("past_sequence_length", min=0, max=config.context_length)
    # an example of batch 2, past 2, 2 new tokens: sizes 0 and 1 would be traced as constants
    shape = (2, config.num_heads, 2, config.head_dim)
    example = (torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 4, dtype=torch.long),
               torch.tensor([[2, 3], [2, 3]]),
               tuple(torch.zeros(shape) for _ in range(2 * n)))
    # the mask's length is past + sequence: the exporter infers that relation itself
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.DYNAMIC},
               "position_ids": {0: batch, 1: seq},
               "past_key_values": tuple({0: batch, 2: past} for _ in range(2 * n))}
    try:
        with torch.no_grad(), _exporter_notes_quiet():
            program = torch.onnx.export(module, example, None, input_names=input_names(n),
                                        output_names=output_names(n), dynamic_shapes=dynamic,
                                        opset_version=OPSET, dynamo=True, verbose=False)
    except Exception as e:
        if _caused_by_interrupt(e):  # torch.export wraps a Ctrl-C in its own error
            raise KeyboardInterrupt from None
        raise
    program.save(str(path))


def _caused_by_interrupt(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False
