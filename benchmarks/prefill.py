"""Prefill workload: time to first token for prompts of 128, 512 and 1024 tokens.

Variants (same weights, same prompt, interleaved rounds after a warm-up): HF
transformers' forward with ``use_cache=True, logits_to_keep=1`` (what its ``generate`` runs
first), and gptfn's ``prefill`` into a static KV cache (eager; it also computes the last
position's logits only).
"""

from __future__ import annotations

from typing import Dict, List

import torch

from benchmarks.harness import environment, interleaved, quick_config


def bench_prefill(quick: bool, rounds: int, preset: str = "gpt2", log=print) -> dict:
    import transformers

    from gptfn import GPTConfig, GPTModel, KVCache
    from gptfn.generation import model_parts
    from gptfn.kv_cache import prefill

    if quick:
        cfg = quick_config()
        lengths = [32, 128]
    else:
        cfg = GPTConfig.from_preset(preset, dropout_rate=0.0)
        lengths = [128, 512, 1024]
    model = GPTModel(cfg, seed=0).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_hf_dict())).eval()
    hf.transformer.load_state_dict(model.state_dict(), strict=False)
    _, params = model_parts(model)
    gen = torch.Generator().manual_seed(0)
    rows: List[Dict[str, object]] = []
    samples_all = {}
    for t in lengths:
        idx = torch.randint(0, cfg.vocab_size, (1, t), generator=gen)

        def ours():
            with torch.no_grad():
                cache = KVCache.create(cfg, 1, t)
                return prefill(params, idx, cache, cfg)[0]

        def theirs():
            with torch.no_grad():
                # what HF generate runs first: logits of the last position only
                return hf(idx, use_cache=True, logits_to_keep=1).logits[:, -1]

        if not torch.allclose(ours(), theirs(), atol=1e-3):
            raise RuntimeError(f"gptfn and HF disagree on the last logits at T={t}")
        log(f"prefill T={t}: {rounds} interleaved rounds")
        samples = interleaved({"hf": theirs, "eager": ours}, rounds=rounds, warmup=1)
        samples_all[t] = samples.times
        for name in ("hf", "eager"):
            rows.append({"T": t, "variant": name, "ttft_ms": samples.median(name) * 1e3,
                         "min_ms": min(samples.times[name]) * 1e3,
                         "max_ms": max(samples.times[name]) * 1e3,
                         "ratio_vs_hf": samples.ratio(name, "hf")})
    lines = ["| T | variant | time to first token (ms, median) | min-max | vs HF |",
             "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['variant']} | {r['ttft_ms']:.1f} | {r['min_ms']:.1f}-"
                     f"{r['max_ms']:.1f} | {r['ratio_vs_hf']:.2f}x |")
    return {"workload": "prefill", "config": cfg.to_dict(), "rounds": rounds,
            "samples_s": samples_all, "rows": rows, "environment": environment(),
            "table": "\n".join(lines)}
