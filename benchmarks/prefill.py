"""Prefill workload: time to first token for prompts of 128, 512 and 1024 tokens.

Variants (same weights, same prompt, interleaved rounds after a warm-up): HF transformers'
forward with ``use_cache=True, logits_to_keep=1`` (what its ``generate`` runs first), and
gptfn's ``prefill`` into a static KV cache (eager; it also computes the last position's
logits only); on the run's device and dtype (``--device``, ``--dtype``). On the CPU in
fp32, gptfn's weight formats too (``eager_bf16``, ``eager_int8``, ``eager_int4``: the same
prefill over the quantized parameters: the core widens each matrix to fp32 and calls the
BLAS, so a format saves no time where the products are bound by compute), and the peers
(``benchmarks.peers``: llama.cpp and ONNX Runtime on gptfn's GGUF and ONNX exports, each in
its own process, timed by its own clock around one pass over the prompt; llama.cpp computes
the last position's logits only, ONNX Runtime every position's, as optimum's export does).

MFU = FLOPs of the prefill / time / peak FLOP/s. FLOPs follow nanoGPT's count for a forward
pass, 2 N + 4 L T C per token (N: the weights' parameters without the embeddings; attention
counted over the full T x T), plus the head for the last position only (2 V C). The peak is
the datasheet's on CUDA, and on the CPU a GEMM probe (1024^3, the same dtype) timed in the
same rounds.
"""

from __future__ import annotations

import statistics
from functools import partial
from typing import Dict, List

import torch

from benchmarks.device import gemm_note, gemm_probe, per_round
from benchmarks.harness import (hf_peer, interleaved, left_out, markdown, model_config,
                                relative_error, result, workload)
from benchmarks.peers import FORMATS, fp32_params, peer_engines


def prefill_flops(cfg, t: int) -> int:
    """FLOPs of a T-token prefill that computes the last position's logits only."""
    from gptfn.params import num_params

    c, v = cfg.embed_dim, cfg.vocab_size
    n = num_params(cfg) - cfg.context_length * c - v * c  # without wpe and wte
    return t * (2 * n + 4 * cfg.num_layers * t * c) + 2 * v * c


def _gptfn(params, idx, cfg, target):
    """gptfn's prefill into a new static KV cache: the last position's logits."""
    from gptfn import KVCache
    from gptfn.kv_cache import prefill

    with torch.no_grad():
        cache = KVCache.create(cfg, 1, idx.size(1), dtype=target.dtype, device=target.device)
        return prefill(params, idx, cache, cfg)[0]


def _hf(hf, idx):
    """What HF generate runs first: a forward pass with logits of the last position only."""
    with torch.no_grad():
        return hf(idx, use_cache=True, logits_to_keep=1).logits[:, -1]


@workload("prefill")
def bench_prefill(opts) -> dict:
    from gptfn import GPTModel
    from gptfn.generation import model_parts

    target = opts.target
    cfg = model_config(opts)
    lengths = [32, 128] if opts.quick else [128, 512, 1024]
    model = GPTModel(cfg, seed=0).eval()
    hf = hf_peer(cfg, model, target, share=True)
    params32 = fp32_params(model) if opts.peers else {}  # what the peers' files are written from
    model = model.to(device=target.device, dtype=target.dtype)
    _, params = model_parts(model)
    formats = {}  # gptfn's weight formats beside fp32: CPU, fp32 compute
    if not target.is_cuda and target.dtype == torch.float32:
        from gptfn.quantization import quantize_params

        formats = {f"eager_{scheme}": quantize_params(params, scheme) for scheme in FORMATS}
    gemm, gemm_flops = gemm_probe(target)
    _, spec_flops = target.spec()
    tol = 1e-3 if target.dtype == torch.float32 else 3e-2
    gen = torch.Generator().manual_seed(0)
    off = "peers run on the CPU" if target.is_cuda else None
    errors: Dict[tuple, float] = {}  # (T, peer) -> last logits' relative error vs gptfn
    rows: List[dict] = []
    samples_all = {}
    with peer_engines(opts.peers, opts.peer_files, cfg, params32, torch.get_num_threads(),
                      off) as (engines, skipped):
        for t in lengths:
            idx = torch.randint(0, cfg.vocab_size, (1, t), generator=gen).to(target.device)
            ours = partial(_gptfn, params, idx, cfg, target)
            error = relative_error(ours(), _hf(hf, idx))
            if error > tol:
                raise RuntimeError(f"gptfn and HF disagree on the last logits at T={t}: relative "
                                   f"error {error:.1e} > {tol:.0e} ({target.dtype_name})")
            # a peer's call returns (logits, seconds by its own clock, around its pass)
            peers = {name: partial(e.prefill, idx[0].tolist()) for name, e in engines.items()}
            for name, peer in peers.items():
                errors[(t, name)] = relative_error(torch.from_numpy(peer()[0]), ours()[0].float())
            for name, quantized in formats.items():
                errors[(t, name)] = relative_error(_gptfn(quantized, idx, cfg, target)[0],
                                                   ours()[0])
            print(f"prefill T={t} on {target.describe()}: {opts.rounds} interleaved rounds")
            variants = {"hf": partial(_hf, hf, idx), "eager": ours, "gemm": gemm,
                        **{name: partial(_gptfn, p, idx, cfg, target)
                           for name, p in formats.items()}, **peers}
            samples = interleaved(variants, rounds=opts.rounds, warmup=1, clock=target.clock(),
                                  keep=True)
            for name in engines:
                samples.times[name] = [seconds for _, seconds in samples.values[name]]
            samples_all[t] = samples.times
            flops = prefill_flops(cfg, t)
            peaks = per_round(spec_flops, gemm_flops, samples.times["gemm"])
            for name in ("hf", "eager", *formats, *engines):
                times = samples.times[name]
                rows.append({"T": t, "variant": name, "ttft_ms": samples.median(name) * 1e3,
                             "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
                             "ratio_vs_hf": samples.ratio(name, "hf"),
                             "mfu": statistics.median(flops / s / p
                                                      for s, p in zip(times, peaks))})
    table = markdown([("T", "{T}"), ("variant", "{variant}"),
                      ("time to first token (ms, median)", "{ttft_ms:.1f}"),
                      ("min-max", "{min_ms:.1f}-{max_ms:.1f}"), ("vs HF", "{ratio_vs_hf:.2f}x"),
                      (f"MFU ({'datasheet' if spec_flops else 'GEMM probe'})", "{mfu:.0%}")], rows)
    gemm_rate = statistics.median(gemm_flops / s for times in samples_all.values()
                                  for s in times["gemm"])
    table += ["", gemm_note(target, gemm_rate, spec_flops) + (
        "; the formats' and the peers' last logits against gptfn fp32's (relative error): "
        + ", ".join(f"{name} at T={t} {e:.1e}" for (t, name), e in errors.items())
        if errors else "") + left_out("peers", skipped)]
    return result("prefill", table, target, cfg, rounds=opts.rounds, samples_s=samples_all,
                  gemm_flops=gemm_flops, spec_flops=spec_flops, rows=rows,
                  peer_errors={f"{name}@{t}": e for (t, name), e in errors.items()
                               if name not in formats},
                  format_errors={f"{name}@{t}": e for (t, name), e in errors.items()
                                 if name in formats},
                  peers_left_out=skipped)
