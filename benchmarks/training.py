"""Training-step workload: tokens/s of one optimizer step, gptfn against HF transformers.

Both models start from the same weights, see the same batches, compute the same loss
(mean cross-entropy over next tokens: HF from its logits with ``F.cross_entropy``, gptfn
with its fused head + loss, ``gptfn.loss``) and step the same optimizer (AdamW with weight decay
on matrices only, gradient clipping at 1.0). A timed call is ``steps`` full training steps
(zero_grad, forward, loss, backward, clip, AdamW step); variants are interleaved in rounds
after a warm-up round. fp32 on the CPU; MFU (nanoGPT's FLOP formula, 6N + 12 L T C FLOPs per
token) is reported against the device's peak only on CUDA (bf16 autocast there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness import Samples, environment, interleaved, quick_config

GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _step_fn(model, optimizer, batches, loss_of, autocast):
    def run():
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_of(model, x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

    return run


def bench_training(quick: bool, rounds: int, device: str = "cpu", log=print) -> dict:
    import transformers

    from gptfn import GPTConfig, GPTModel
    from gptfn.train import TrainSettings, make_optimizer

    if quick:
        cfg = quick_config(context_length=64, embed_dim=64, dropout_rate=0.1)
        batch, steps = 4, 2
    else:
        cfg = GPTConfig(vocab_size=50257, context_length=128, embed_dim=256, num_layers=4,
                        num_heads=8, dropout_rate=0.1)
        batch, steps = 8, 3
    dev = torch.device(device)
    ours = GPTModel(cfg, seed=0).to(dev).train()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_hf_dict())).to(dev).train()
    hf.transformer.load_state_dict(ours.state_dict(), strict=False)
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise RuntimeError("HF's head is not tied to wte")
    settings = TrainSettings(lr=3e-4)
    opt_ours, opt_hf = make_optimizer(ours, settings), make_optimizer(hf, settings)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        data = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), generator=gen)
        batches.append((data[:, :-1].to(dev), data[:, 1:].to(dev)))
    if dev.type == "cuda":
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
        sync = torch.cuda.synchronize
    else:
        autocast, sync = _null, lambda: None
    variants = {
        "hf": _step_fn(hf, opt_hf, batches, _hf_loss, autocast),
        "gptfn": _step_fn(ours, opt_ours, batches, lambda m, x, y: m(x, y), autocast),
    }
    tokens = steps * batch * cfg.context_length
    log(f"training: {cfg.num_layers} layers x {cfg.embed_dim} wide, vocab {cfg.vocab_size}, "
        f"batch {batch} x {cfg.context_length}, {steps} steps per call, {rounds} rounds, {dev}")
    samples: Samples = interleaved(variants, rounds=rounds, warmup=1, sync=sync,
                                   progress=lambda m: log(f"  {m}"))
    n = ours.num_params()
    flops_per_token = 6 * n + 12 * cfg.num_layers * cfg.context_length * cfg.embed_dim
    peak = None
    if dev.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
    rows = []
    for name in ("hf", "gptfn"):
        t = samples.median(name)
        rate = tokens / t
        rows.append({
            "variant": name,
            "tokens_per_s": rate,
            "min_tokens_per_s": tokens / max(samples.times[name]),
            "max_tokens_per_s": tokens / min(samples.times[name]),
            "ratio_vs_hf": samples.ratio(name, "hf"),
            "mfu": rate * flops_per_token / peak if peak else None,
        })
    lines = ["| variant | tokens/s (median) | min-max | vs HF | MFU |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu'] * 100:.1f}%"
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['min_tokens_per_s']:,.0f}-"
                     f"{r['max_tokens_per_s']:,.0f} | {r['ratio_vs_hf']:.2f}x | {mfu} |")
    table = "\n".join(lines)
    return {
        "workload": "training",
        "config": cfg.to_dict(),
        "batch": batch,
        "steps_per_call": steps,
        "rounds": rounds,
        "samples_s": samples.times,
        "flops_per_token": flops_per_token,
        "rows": rows,
        "environment": environment(),
        "table": table,
    }


def _hf_loss(model, x, y):
    logits = model(x).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
