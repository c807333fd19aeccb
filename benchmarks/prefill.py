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
from typing import Dict, List, Optional, Sequence

import torch

from benchmarks.device import Target, gemm_probe, per_round
from benchmarks.harness import environment, hf_peer, interleaved, quick_config, relative_error
from benchmarks.peers import FORMATS, PeerFiles, fp32_params, peer_engines


def prefill_flops(cfg, t: int) -> int:
    """FLOPs of a T-token prefill that computes the last position's logits only."""
    from gptfn.params import num_params

    c, v = cfg.embed_dim, cfg.vocab_size
    n = num_params(cfg) - cfg.context_length * c - v * c  # without wpe and wte
    return t * (2 * n + 4 * cfg.num_layers * t * c) + 2 * v * c


def bench_prefill(quick: bool, rounds: int, preset: str = "gpt2",
                  target: Optional[Target] = None, peers: Sequence[str] = (),
                  peer_files: Optional[PeerFiles] = None, log=print) -> dict:
    from gptfn import GPTConfig, GPTModel, KVCache
    from gptfn.generation import model_parts
    from gptfn.kv_cache import prefill

    target = target or Target.parse()

    if quick:
        cfg = quick_config()
        lengths = [32, 128]
    else:
        cfg = GPTConfig.from_preset(preset, dropout_rate=0.0)
        lengths = [128, 512, 1024]
    model = GPTModel(cfg, seed=0).eval()
    hf = hf_peer(cfg, model, target, share=True)
    params32 = fp32_params(model) if peers else {}  # what the peers' files are written from
    model = model.to(device=target.device, dtype=target.dtype)
    _, params = model_parts(model)
    formats = {}  # gptfn's weight formats beside fp32: CPU, fp32 compute
    if not target.is_cuda and target.dtype == torch.float32:
        from gptfn.quantization import quantize_params

        formats = {f"eager_{scheme}": quantize_params(params, scheme) for scheme in FORMATS}
    clock = target.clock()
    gemm, gemm_flops = gemm_probe(target)
    _, spec_flops = target.spec()
    tol = 1e-3 if target.dtype == torch.float32 else 3e-2
    gen = torch.Generator().manual_seed(0)
    off = "peers run on the CPU" if target.is_cuda else None
    errors: Dict[tuple, float] = {}  # (T, peer) -> last logits' relative error vs gptfn
    with peer_engines(peers, peer_files, cfg, params32, torch.get_num_threads(), off,
                      log) as (engines, skipped):
        rows: List[Dict[str, object]] = []
        samples_all = {}
        for t in lengths:
            idx = torch.randint(0, cfg.vocab_size, (1, t), generator=gen).to(target.device)

            def ours(params=params):
                with torch.no_grad():
                    cache = KVCache.create(cfg, 1, t, dtype=target.dtype, device=target.device)
                    return prefill(params, idx, cache, cfg)[0]

            def theirs():
                with torch.no_grad():
                    # what HF generate runs first: logits of the last position only
                    return hf(idx, use_cache=True, logits_to_keep=1).logits[:, -1]

            error = relative_error(ours(), theirs())
            if error > tol:
                raise RuntimeError(f"gptfn and HF disagree on the last logits at T={t}: relative "
                                   f"error {error:.1e} > {tol:.0e} ({target.dtype_name})")
            peer_s: Dict[str, List[float]] = {name: [] for name in engines}

            def peer(name: str, ids=idx[0].tolist()):
                logits, seconds = engines[name].prefill(ids)
                peer_s[name].append(seconds)  # the engine's own clock, around its pass
                return torch.from_numpy(logits)

            for name in engines:
                errors[(t, name)] = relative_error(peer(name), ours()[0].float())
                peer_s[name].clear()
            for name, quantized in formats.items():
                errors[(t, name)] = relative_error(ours(quantized)[0], ours()[0])
            log(f"prefill T={t} on {target.describe()}: {rounds} interleaved rounds")
            variants = {"hf": theirs, "eager": ours, "gemm": gemm,
                        **{name: (lambda p=p: ours(p)) for name, p in formats.items()},
                        **{name: (lambda name=name: peer(name)) for name in engines}}
            samples = interleaved(variants, rounds=rounds, warmup=1, clock=clock)
            for name in engines:
                samples.times[name] = peer_s[name][1:]  # less the warm-up round
            samples_all[t] = samples.times
            flops = prefill_flops(cfg, t)
            peaks = per_round(spec_flops, gemm_flops, samples.times["gemm"])
            for name in ("hf", "eager", *formats, *engines):
                mfu = [flops / s / p for s, p in zip(samples.times[name], peaks)]
                rows.append({"T": t, "variant": name, "ttft_ms": samples.median(name) * 1e3,
                             "min_ms": min(samples.times[name]) * 1e3,
                             "max_ms": max(samples.times[name]) * 1e3,
                             "ratio_vs_hf": samples.ratio(name, "hf"),
                             "mfu": statistics.median(mfu)})
    peak_name = "datasheet" if spec_flops else "GEMM probe"
    lines = [f"| T | variant | time to first token (ms, median) | min-max | vs HF "
             f"| MFU ({peak_name}) |", "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['variant']} | {r['ttft_ms']:.1f} | {r['min_ms']:.1f}-"
                     f"{r['max_ms']:.1f} | {r['ratio_vs_hf']:.2f}x | {r['mfu'] * 100:.0f}% |")
    gemm_rates = [gemm_flops / s for s in
                  (x for times in samples_all.values() for x in times["gemm"])]
    lines += ["", f"{target.describe()}; GEMM probe {statistics.median(gemm_rates) / 1e9:.0f} "
                  "GFLOP/s (median)" + (f"; datasheet peak {spec_flops / 1e12:.0f} TFLOP/s"
                                        if spec_flops else "")]
    if errors:
        lines[-1] += ("; the formats' and the peers' last logits against gptfn fp32's "
                      "(relative error): "
                      + ", ".join(f"{name} at T={t} {e:.1e}" for (t, name), e in errors.items()))
    if skipped:
        lines[-1] += "; peers left out: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())
    return {"workload": "prefill", "config": cfg.to_dict(), "device": str(target.device),
            "dtype": target.dtype_name, "rounds": rounds, "samples_s": samples_all,
            "gemm_flops": gemm_flops, "spec_flops": spec_flops, "rows": rows,
            "peer_errors": {f"{name}@{t}": e for (t, name), e in errors.items()
                            if name not in formats},
            "format_errors": {f"{name}@{t}": e for (t, name), e in errors.items()
                              if name in formats},
            "peers_left_out": skipped,
            "environment": environment(), "table": "\n".join(lines)}
