"""Helpers shared by the tests: tiny configs, seeded inputs."""

import torch

from gptfn import GPTConfig


def tiny_config(**overrides) -> GPTConfig:
    base = dict(
        vocab_size=97, context_length=32, embed_dim=32, num_layers=2, num_heads=4,
        dropout_rate=0.0,
    )
    base.update(overrides)
    return GPTConfig(**base)


def random_idx(cfg: GPTConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)


def randomize_ln_and_biases(params, seed: int = 1):
    """init_params sets layer norms to 1/0 and biases to 0; tests that must see those
    tensors used (parity, key mapping) perturb them so a swapped key cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in params.items():
        if k.endswith(".bias") or "ln_" in k:
            v = v + 0.1 * torch.randn(v.shape, generator=gen)
        out[k] = v
    return out


def hf_model(cfg: GPTConfig, seed: int = 0):
    """HF transformers' GPT2LMHeadModel for ``cfg``, seeded, with biases and layer norms
    perturbed (HF initialises them to 0 and 1, which would hide a swapped key)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_hf_dict())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits
