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
                          self.vocab_size, self.context_length, 0.0, False)

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
                                   self.num_layers, self.num_heads, self.eps, True,
                                   True)[:, -1]  # a prefill of unpadded rows
        out = [idx]
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, 1.0, None)  # (B,)
            out.append(token.view(-1, 1))
            if step + 1 < max_new_tokens:
                pos = torch.full([1], t + step, dtype=torch.long, device=idx.device)
                logits = gpt_cached_logits(self.params, token.view(-1, 1), keys, values, pos,
                                           start, self.num_layers, self.num_heads, self.eps,
                                           False)[:, -1]
        return torch.cat(out, dim=1)


class DecodeStep(nn.Module):
    """One decode step with the cache as explicit inputs and outputs (for torch.export /
    AOTInductor): ``(token (B,1), keys, values, input_pos (1,)) -> (logits (B, V), keys,
    values)``. The caches are returned updated (out of place), so the program has no side
    effects."""

    def __init__(self, config: GPTConfig, params: Dict[str, Tensor]):
        super().__init__()
        self.config = config
        for i, (k, v) in enumerate(params.items()):
            self.register_buffer(f"p{i}", v.detach().contiguous())
        self.keys_order = list(params)

    def forward(self, token: Tensor, keys: Tensor, values: Tensor, input_pos: Tensor):
        """Shapes: token (B, 1), keys/values (L, B, nh, T_max, hs), input_pos (1,)."""
        params = {k: getattr(self, f"p{i}") for i, k in enumerate(self.keys_order)}
        k_list = [keys[i].clone() for i in range(self.config.num_layers)]
        v_list = [values[i].clone() for i in range(self.config.num_layers)]
        start = torch.zeros(token.size(0), dtype=torch.long, device=token.device)
        logits = gpt_cached_logits(params, token, k_list, v_list, input_pos, start,
                                   self.config.num_layers, self.config.num_heads,
                                   self.config.layer_norm_eps, False)[:, -1]
        return logits, torch.stack(k_list), torch.stack(v_list)
