"""The modules that become artifacts: GPT-2 with its weights inside, for TorchScript and
torch.export. Both call the functional core (``gpt_logits``, ``gpt_cached_logits``,
``sample_next``) on a parameter dict, so an artifact computes exactly what eager gptfn does.
"""


from typing import Dict, List

import torch
from torch import Tensor, nn

from gptfn.config import GPTConfig
from gptfn.functional.model import gpt_cached_logits, gpt_logits
from gptfn.functional.sampling import sample_next


class ScriptableGPT(nn.Module):
    """``forward(idx) -> logits`` and a self-contained ``generate`` (prefill + decode over a
    static KV cache of ``max_seq_len`` slots), for ``torch.jit.script``."""

    params: Dict[str, Tensor]

    def __init__(self, config: GPTConfig, params: Dict[str, Tensor], max_seq_len: int):
        super().__init__()
        self.params = {k: v.detach().contiguous() for k, v in params.items()}
        self.num_layers = config.num_layers
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.eps = config.layer_norm_eps
        self.vocab_size = config.vocab_size
        self.context_length = config.context_length
        self.max_seq_len = max_seq_len

    def forward(self, idx: Tensor) -> Tensor:
        """Shapes: idx (B, T) -> logits (B, T, V)."""
        return gpt_logits(self.params, idx, self.num_layers, self.num_heads, self.eps,
                          self.vocab_size, self.context_length)

    @torch.jit.export
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float, top_k: int,
                 seed: int) -> Tensor:
        """Full sequences (B, T + max_new_tokens): greedy when temperature == 0, top_k == 0
        for no top-k; sampling draws from torch's global generator seeded with ``seed``."""
        b, t = idx.size(0), idx.size(1)
        if t + max_new_tokens > self.max_seq_len:
            raise ValueError(f"{t} + {max_new_tokens} tokens exceed max_seq_len {self.max_seq_len}")
        if temperature < 0.0 or top_k < 0:
            raise ValueError("temperature and top_k must be >= 0")
        wte = self.params["wte.weight"]
        shape = [b, self.num_heads, self.max_seq_len, self.head_dim]
        keys: List[Tensor] = []
        values: List[Tensor] = []
        for _ in range(self.num_layers):
            keys.append(torch.zeros(shape, dtype=wte.dtype, device=wte.device))
            values.append(torch.zeros(shape, dtype=wte.dtype, device=wte.device))
        start = torch.zeros([b], dtype=torch.long, device=idx.device)
        torch.manual_seed(seed)
        logits = gpt_cached_logits(self.params, idx, keys, values,
                                   torch.arange(t, device=idx.device), start,
                                   self.num_layers, self.num_heads, self.eps, last_only=True,
                                   unpadded_prefill=True)[:, -1]
        out = [idx]
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k)  # (B,): no top-p, the global RNG
            out.append(token.view(-1, 1))
            if step + 1 < max_new_tokens:
                pos = torch.full([1], t + step, dtype=torch.long, device=idx.device)
                logits = gpt_cached_logits(self.params, token.view(-1, 1), keys, values, pos,
                                           start, self.num_layers, self.num_heads,
                                           self.eps)[:, -1]
        return torch.cat(out, dim=1)


class _Weights(nn.Module):
    """The parameters as frozen parameters ``p0, p1, ...`` (one per key, in order): what
    torch.export lifts into a program's constants, shared by the AOTInductor package's two
    programs. Parameters, not buffers: AOTInductor copies every buffer of a program it
    compiles (a buffer may be mutated), which held two more copies of the weights while a
    package was built."""

    def __init__(self, config: GPTConfig, params: Dict[str, Tensor]):
        super().__init__()
        self.config = config
        for i, (k, v) in enumerate(params.items()):
            self.register_parameter(f"p{i}", nn.Parameter(v.detach().contiguous(),
                                                          requires_grad=False))
        self.keys_order = list(params)

    def params(self) -> Dict[str, Tensor]:
        return {k: getattr(self, f"p{i}") for i, k in enumerate(self.keys_order)}

    def _logits(self, idx: Tensor, keys: List[Tensor], values: List[Tensor],
                input_pos: Tensor, unpadded_prefill: bool) -> Tensor:
        start = torch.zeros(idx.size(0), dtype=torch.long, device=idx.device)
        c = self.config
        return gpt_cached_logits(self.params(), idx, keys, values, input_pos, start,
                                 c.num_layers, c.num_heads, c.layer_norm_eps,
                                 unpadded_prefill=unpadded_prefill)


class CachedForward(_Weights):
    """The forward pass that also fills a KV cache (for torch.export / AOTInductor):
    ``(idx (B, T), keys, values) -> logits (B, T, V)``, writing the keys and values of the
    T tokens into cache slots 0..T-1. ``keys``/``values`` are lists of one tensor per layer,
    (B, nh, T_max, hs), written in place. With a fresh cache it is ``forward(idx)``; it is
    also the prefill before ``DecodeStep``."""

    def forward(self, idx: Tensor, keys: List[Tensor], values: List[Tensor]) -> Tensor:
        input_pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
        return self._logits(idx, keys, values, input_pos, unpadded_prefill=True)  # (B, T, V)


class DecodeStep(_Weights):
    """One decode step (for torch.export / AOTInductor): ``(token (B, 1), keys, values,
    input_pos (1,)) -> logits (B, V)``, the token's keys and values written into slot
    ``input_pos`` of the caches in place. One tensor per layer: a step then writes one slot
    of each, where a stacked (L, ...) cache would be copied whole by every layer's write."""

    def forward(self, token: Tensor, keys: List[Tensor], values: List[Tensor],
                input_pos: Tensor) -> Tensor:
        return self._logits(token, keys, values, input_pos, unpadded_prefill=False)[:, -1]  # (B, V)
