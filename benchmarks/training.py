"""Training-step workload: tokens/s of one optimizer step, gptfn against HF transformers.

Both models start from the same weights, see the same batches, compute the same loss
(mean cross-entropy over next tokens: HF from its logits with ``F.cross_entropy``, gptfn
with its fused head + loss, ``gptfn.loss``) and step the same optimizer (AdamW with weight decay
on matrices only, gradient clipping at 1.0). A timed call is ``steps`` full training steps
(zero_grad, forward, loss, backward, clip, AdamW step); variants are interleaved in rounds
after a warm-up round.

The model: on the CPU a small one (4 layers x 256 wide, GPT-2's vocabulary, batch 8 x 128),
so that a round takes seconds; on CUDA the ``--model`` preset at its full context of 1024
(batch ``--batch-size``, default 8). Weights and AdamW stay fp32; ``--dtype bf16/fp16``
runs forward and backward under autocast (fp16 with a gradient scaler, as fp16 training
needs). MFU = tokens/s x nanoGPT's 6 N + 12 L T C FLOPs per token / peak FLOP/s: the
datasheet's peak at the dtype on CUDA, a GEMM probe timed in the same rounds on the CPU.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from benchmarks.device import Target, gemm_note, gemm_probe, per_round
from benchmarks.harness import hf_peer, interleaved, markdown, quick_config, result, workload


def _step_fn(model, optimizer, batches, loss_of, target: Target):
    """One timed call: every batch through a full training step, under autocast at the
    target's dtype unless it is fp32 (fp16 with a gradient scaler)."""
    half = target.dtype != torch.float32
    scaler = torch.amp.GradScaler(target.device.type, enabled=target.dtype == torch.float16)

    def run():
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(target.device.type, dtype=target.dtype, enabled=half):
                loss = loss_of(model, x, y)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()

    return run


def training_flops_per_token(cfg, n_params: int) -> int:
    """nanoGPT's estimate: 6 N (forward and backward through the weights) + 12 L T C
    (attention over the full context)."""
    return 6 * n_params + 12 * cfg.num_layers * cfg.context_length * cfg.embed_dim


def _hf_loss(model, x, y):
    logits = model(x).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@workload("training")
def bench_training(opts) -> dict:
    from gptfn import GPTConfig, GPTModel
    from gptfn.train import TrainSettings, make_optimizer

    target = opts.target
    batch, steps = (4, 2) if opts.quick else (8, 3)
    if opts.quick:
        cfg = quick_config(context_length=64, embed_dim=64, dropout_rate=0.1)
    elif target.is_cuda:
        cfg = GPTConfig.from_preset(opts.model, dropout_rate=0.1)
    else:
        cfg = GPTConfig(vocab_size=50257, context_length=128, embed_dim=256, num_layers=4,
                        num_heads=8, dropout_rate=0.1)
    batch = opts.batch_size or batch
    dev = target.device
    ours = GPTModel(cfg, seed=0).train()
    hf = hf_peer(cfg, ours, Target(dev)).train()  # fp32 weights: autocast does the rest
    ours = ours.to(dev)
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise RuntimeError("HF's head is not tied to wte")
    settings = TrainSettings(lr=3e-4)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        data = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), generator=gen)
        batches.append((data[:, :-1].to(dev), data[:, 1:].to(dev)))
    gemm, gemm_flops = gemm_probe(target)
    variants = {
        "hf": _step_fn(hf, make_optimizer(hf, settings), batches, _hf_loss, target),
        "gptfn": _step_fn(ours, make_optimizer(ours, settings), batches,
                          lambda m, x, y: m(x, y), target),
        "gemm": gemm,
    }
    tokens = steps * batch * cfg.context_length
    print(f"training: {cfg.num_layers} layers x {cfg.embed_dim} wide, vocab {cfg.vocab_size}, "
          f"batch {batch} x {cfg.context_length}, {steps} steps per call, {opts.rounds} rounds, "
          f"{target.describe()}")
    samples = interleaved(variants, rounds=opts.rounds, warmup=1, clock=target.clock(),
                          progress=lambda m: print(f"  {m}"))
    flops_per_token = training_flops_per_token(cfg, ours.num_params())
    _, spec_flops = target.spec()
    peaks = per_round(spec_flops, gemm_flops, samples.times["gemm"])
    rows = [{"variant": name,
             "tokens_per_s": tokens / samples.median(name),
             "min_tokens_per_s": tokens / max(samples.times[name]),
             "max_tokens_per_s": tokens / min(samples.times[name]),
             "ratio_vs_hf": samples.ratio(name, "hf"),
             "mfu": statistics.median(tokens / s * flops_per_token / p
                                      for s, p in zip(samples.times[name], peaks))}
            for name in ("hf", "gptfn")]
    table = markdown([("variant", "{variant}"), ("tokens/s (median)", "{tokens_per_s:,.0f}"),
                      ("min-max", "{min_tokens_per_s:,.0f}-{max_tokens_per_s:,.0f}"),
                      ("vs HF", "{ratio_vs_hf:.2f}x"),
                      (f"MFU ({'datasheet' if spec_flops else 'GEMM probe'})", "{mfu:.1%}")],
                     rows)
    table += ["", gemm_note(target, gemm_flops / samples.median("gemm"), spec_flops)]
    return result("training", table, target, cfg, spec_flops=spec_flops, gemm_flops=gemm_flops,
                  batch=batch, steps_per_call=steps, rounds=opts.rounds,
                  samples_s=samples.times, flops_per_token=flops_per_token, rows=rows)
