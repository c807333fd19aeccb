"""Thin nn.Module wrappers over ``gptfn.functional``: parameters plus one call each.

The module tree mirrors the checkpoint, so ``GPTModel.state_dict()`` keys are exactly the
canonical keys, ``load_state_dict(params)`` and ``torch.func.functional_call(model, params,
(idx,))`` just work, and ``torch.jit.script(model)`` / ``torch.compile(model)`` see only
tensors and plain numbers. Weights are ``[in, out]``; the output head is ``wte``.

The standalone layers (``SelfAttention``, ``CausalAttention``, ``MultiHeadAttention`` ...)
keep the GPTModelV1 API's constructor signatures.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from gptfn import functional as F
from gptfn.config import GPTConfig, resolve_config
from gptfn.formats import SCALE_SUFFIX, scheme_of
from gptfn.inputs import as_token_rows, check_targets, check_tokens
from gptfn.loss import IGNORE_INDEX, linear_cross_entropy
from gptfn.params import init_params, num_params, validate_params

if TYPE_CHECKING:
    from gptfn.kv_cache import KVCache


def _normal(shape, device, std: float = 0.02) -> nn.Parameter:
    t = torch.empty(shape, device=device)
    if t.device.type != "meta":
        nn.init.normal_(t, 0.0, std)
    return nn.Parameter(t)


class Linear(nn.Module):
    """``x @ weight + bias`` with weight ``[in, out]`` (GPT-2's Conv1D layout)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.weight = _normal((in_features, out_features), device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("weight_scale", None)  # an int8 weight's scales (gptfn.formats)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias, self.weight_scale)


class GELU(nn.Module):
    """GPT-2's tanh-approximated GELU."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x)


class LayerNorm(nn.Module):
    """Layer norm over the last dimension with learnable ``weight`` (scale) and ``bias`` (shift)."""

    def __init__(self, embed_dim: int, eps: float = 1e-5, device=None):
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(embed_dim, device=device))
        self.bias = nn.Parameter(torch.zeros(embed_dim, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class FeedForward(nn.Module):
    """GPT-2's MLP: ``c_fc`` (C -> 4C), GELU, ``c_proj`` (4C -> C)."""

    def __init__(self, embed_dim: int, device=None):
        super().__init__()
        self.c_fc = Linear(embed_dim, 4 * embed_dim, device=device)
        self.c_proj = Linear(4 * embed_dim, embed_dim, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return F.feed_forward(
            x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
            c_fc_scale=self.c_fc.weight_scale, c_proj_scale=self.c_proj.weight_scale,
        )


class SelfAttention(nn.Module):
    """One head of self-attention with separate query, key and value projections; no mask."""

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False, device=None):
        super().__init__()
        self.W_query = Linear(d_in, d_out, bias=qkv_bias, device=device)
        self.W_key = Linear(d_in, d_out, bias=qkv_bias, device=device)
        self.W_value = Linear(d_in, d_out, bias=qkv_bias, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return F.self_attention(
            x, self.W_query.weight, self.W_key.weight, self.W_value.weight,
            self.W_query.bias, self.W_key.bias, self.W_value.bias,
        )


class CausalAttention(nn.Module):
    """One head of causal self-attention with dropout on the attention weights."""

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float,
        qkv_bias: bool = False, device=None,
    ):
        super().__init__()
        self.context_length = int(context_length)
        self.dropout = float(dropout)
        self.W_query = Linear(d_in, d_out, bias=qkv_bias, device=device)
        self.W_key = Linear(d_in, d_out, bias=qkv_bias, device=device)
        self.W_value = Linear(d_in, d_out, bias=qkv_bias, device=device)

    def forward(self, x: Tensor) -> Tensor:
        _check_length(x, self.context_length)
        return F.causal_attention(
            x, self.W_query.weight, self.W_key.weight, self.W_value.weight,
            self.W_query.bias, self.W_key.bias, self.W_value.bias,
            self.dropout, self.training,
        )


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention with a fused qkv projection ``c_attn`` and output ``c_proj``."""

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
        qkv_bias: bool = False, device=None,
    ):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.context_length = int(context_length)
        self.num_heads = int(num_heads)
        self.dropout = float(dropout)
        self.c_attn = Linear(d_in, 3 * d_out, bias=qkv_bias, device=device)
        self.c_proj = Linear(d_out, d_out, device=device)

    def forward(self, x: Tensor) -> Tensor:
        _check_length(x, self.context_length)
        return F.multi_head_attention(
            x, self.c_attn.weight, self.c_attn.bias, self.c_proj.weight, self.c_proj.bias,
            self.num_heads, dropout_p=self.dropout, training=self.training,
            c_attn_scale=self.c_attn.weight_scale, c_proj_scale=self.c_proj.weight_scale,
        )


class TransformerBlock(nn.Module):
    """One pre-LN GPT-2 block: ``ln_1``, ``attn``, ``ln_2``, ``mlp``."""

    def __init__(self, config: Union[GPTConfig, Mapping[str, Any]], device=None):
        super().__init__()
        cfg = resolve_config(config)
        c = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.eps = cfg.layer_norm_eps
        self.dropout = cfg.dropout_rate
        self.ln_1 = LayerNorm(c, cfg.layer_norm_eps, device=device)
        self.attn = MultiHeadAttention(
            c, c, cfg.context_length, cfg.dropout_rate, cfg.num_heads, cfg.qkv_bias, device=device
        )
        self.ln_2 = LayerNorm(c, cfg.layer_norm_eps, device=device)
        self.mlp = FeedForward(c, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return F.transformer_block(
            x,
            ln_1_weight=self.ln_1.weight, ln_1_bias=self.ln_1.bias,
            c_attn_weight=self.attn.c_attn.weight, c_attn_bias=self.attn.c_attn.bias,
            attn_c_proj_weight=self.attn.c_proj.weight, attn_c_proj_bias=self.attn.c_proj.bias,
            ln_2_weight=self.ln_2.weight, ln_2_bias=self.ln_2.bias,
            c_fc_weight=self.mlp.c_fc.weight, c_fc_bias=self.mlp.c_fc.bias,
            mlp_c_proj_weight=self.mlp.c_proj.weight, mlp_c_proj_bias=self.mlp.c_proj.bias,
            num_heads=self.num_heads, eps=self.eps, dropout_p=self.dropout,
            training=self.training,
            c_attn_scale=self.attn.c_attn.weight_scale,
            attn_c_proj_scale=self.attn.c_proj.weight_scale,
            c_fc_scale=self.mlp.c_fc.weight_scale,
            mlp_c_proj_scale=self.mlp.c_proj.weight_scale,
        )


class Embedding(nn.Module):
    """A ``weight`` table of shape (num_embeddings, embed_dim)."""

    def __init__(self, num_embeddings: int, embed_dim: int, device=None):
        super().__init__()
        self.weight = _normal((num_embeddings, embed_dim), device)
        self.register_buffer("weight_scale", None)  # int8 rows' scales (gptfn.formats)

    def forward(self, idx: Tensor) -> Tensor:
        return torch.nn.functional.embedding(idx, self.weight)


class GPTModel(nn.Module):
    """GPT-2: ``logits = GPTModel(config)(idx)``.

    ``config`` is a GPTConfig, a preset name or a dict in any of the spellings
    ``GPTConfig.from_dict`` reads. Parameters come from ``params`` (a canonical dict, used
    as is: no copy) or from ``init_params(config, seed)``; with no seed, the seed is drawn
    from torch's global generator, so ``torch.manual_seed`` makes models reproducible.
    """

    __jit_ignored_attributes__ = ["config"]

    def __init__(
        self,
        config: Union[GPTConfig, Mapping[str, Any], str],
        params: Optional[Mapping[str, Tensor]] = None,
        seed: Optional[int] = None,
    ):
        super().__init__()
        cfg = resolve_config(config)
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.context_length = cfg.context_length
        self.num_heads = cfg.num_heads
        self.eps = cfg.layer_norm_eps
        self.dropout = cfg.dropout_rate
        self.ignore_index = IGNORE_INDEX  # targets left out of the loss (padding)
        meta = torch.device("meta")
        self.wte = Embedding(cfg.vocab_size, cfg.embed_dim, device=meta)
        self.wpe = Embedding(cfg.context_length, cfg.embed_dim, device=meta)
        self.h = nn.ModuleList([TransformerBlock(cfg, device=meta) for _ in range(cfg.num_layers)])
        self.ln_f = LayerNorm(cfg.embed_dim, cfg.layer_norm_eps, device=meta)
        if params is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            params = init_params(cfg, seed)
        self.set_params(params)

    def set_params(self, params: Mapping[str, Tensor]) -> None:
        """Take ``params`` (canonical keys and shapes, checked) as this model's parameters,
        without copying them."""
        validate_params(params, self.config)
        if scheme_of(params) is None:
            self.load_state_dict(dict(params), strict=True, assign=True)
            return
        for key, t in params.items():  # a format is for inference: nothing needs a gradient
            owner, _, name = key.rpartition(".")
            module = self.get_submodule(owner)
            if name.endswith(SCALE_SUFFIX):
                setattr(module, name, t)
            else:
                setattr(module, name, nn.Parameter(t, requires_grad=False))

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> Tensor:
        """Logits; or, given ``targets``, the mean next-token cross-entropy (a scalar),
        computed by ``gptfn.loss.linear_cross_entropy`` without materialising the logits.
        Targets equal to ``ignore_index`` (-100, as in ``F.cross_entropy``: padding) are
        left out of the mean; if every target is -100 the mean is NaN, as there.

        In eager mode ``idx`` and ``targets`` may also be lists or numpy arrays (a flat
        list is one row); the scripted module takes tensors only.

        Shapes: idx (B, T) -> logits (B, T, V); targets (B, T) -> loss ().
        """
        if not torch.jit.is_scripting():
            if not isinstance(idx, Tensor):  # ids from the host: name a bad one (no sync)
                idx = as_token_rows(idx, "idx", self.wte.weight.device)
                check_tokens(idx, self.vocab_size, self.context_length)
            if targets is not None and not isinstance(targets, Tensor):  # as idx above
                targets = as_token_rows(targets, "targets", self.wte.weight.device)
                check_targets(targets, self.vocab_size, self.ignore_index)
        F.check_idx(idx, self.vocab_size, self.context_length)
        pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
        x = F.embed(idx, pos, self.wte.weight, self.wpe.weight, self.dropout, self.training,
                    self.wte.weight_scale)  # (B, T, C)
        for block in self.h:
            x = block(x)  # (B, T, C)
        if targets is None:
            return F.lm_head(x, self.ln_f.weight, self.ln_f.bias, self.wte.weight, self.eps,
                             self.wte.weight_scale)
        if targets.shape != idx.shape:
            raise ValueError(
                f"targets must have the shape of idx {list(idx.shape)}, got {list(targets.shape)}"
            )
        if targets.dtype != torch.long and targets.dtype != torch.int:
            raise ValueError(
                f"targets must hold integer token ids (int64 or int32), got {targets.dtype}"
            )
        x = F.final_norm(x, self.ln_f.weight, self.ln_f.bias, self.eps)  # (B, T, C)
        plain = self.wte.weight.dtype == x.dtype and self.wte.weight_scale is None
        if not torch.jit.is_scripting() and plain:
            return linear_cross_entropy(
                x.flatten(0, 1), self.wte.weight, targets.flatten(), self.ignore_index
            )
        logits = F.tied_head(x, self.wte.weight, self.wte.weight_scale)  # (B, T, V)
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten().long(), ignore_index=self.ignore_index
        )

    # ------------------------------------------------------- cached inference
    def prefill(self, idx: Tensor, cache: "KVCache", start: Optional[Tensor] = None):
        """``gptfn.kv_cache.prefill`` with this model's parameters: (logits (B, V), cache)."""
        from gptfn.kv_cache import prefill

        return prefill(params_of(self), idx, cache, self.config, start)

    def decode_step(self, token: Tensor, cache: "KVCache", input_pos: Tensor):
        """``gptfn.kv_cache.decode_step`` with this model's parameters: (logits (B, V), cache)."""
        from gptfn.kv_cache import decode_step

        return decode_step(params_of(self), token, cache, input_pos, self.config)

    def num_params(self, include_embeddings: bool = True) -> int:
        return num_params(self.config, include_embeddings)

    # ------------------------------------------------------------- weights I/O
    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, os.PathLike],
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str]] = None,
        download: bool = True,
    ) -> "GPTModel":
        """Load a checkpoint path (a ``.safetensors`` file with config.json beside it, a
        directory holding both, or an OpenAI TF release directory), or a model name
        (``gpt2`` ... ``gpt2-xl``, ``124M`` ...) from gptfn's cache, downloading it from the
        hub first when it is not there and ``download`` is true (``gptfn.weights.resolve``:
        the policy every command follows too)."""
        from gptfn.weights import load_params
        from gptfn.weights.resolve import locate

        config, params = load_params(locate(path, allow_download=download), dtype=dtype,
                                     device=device)
        return cls(config, params=params).eval()

    def save_pretrained(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``model.safetensors`` + ``config.json`` into directory ``path``."""
        from gptfn.weights import save_params

        return save_params(self.state_dict(), path, self.config)


# The GPTModelV1 API's name, for its users' code (``GPTModelV1(gpt_config)``).
GPTModelV1 = GPTModel


def _check_length(x: Tensor, context_length: int) -> None:
    if x.size(-2) > context_length:
        raise ValueError(
            f"sequence length {x.size(-2)} exceeds context_length {context_length}"
        )


def params_of(model: nn.Module) -> Dict[str, Tensor]:
    """The canonical params of a GPTModel (or of a compiled one), detached, no copy."""
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach() for k, v in model.state_dict().items()}
