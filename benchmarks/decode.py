"""Decode workload: tokens/s of batch-1 greedy generation against HF transformers.

Variants, same weights and prompt, interleaved in rounds after a warm-up:

- ``hf``: HF transformers' ``GPT2LMHeadModel.generate`` (sdpa attention, dynamic cache),
  the peer;
- ``eager``: ``gptfn.generate`` (static KV cache, functional core);
- ``compiled``: the same with ``compile=True`` (decode step compiled; compile time is
  measured apart, in the warm-up);
- ``gemv``: the GEMV kernel gptfn's decode step streams its weights with (``gptfn::gemv``,
  OpenBLAS, where registered; else ``torch.mv``) over a 256 MiB fp32 matrix with rows of
  768: the bandwidth a batch-1 decode step can get, measured in the same rounds;
- ``stream``: a plain sum over the same matrix: what the memory system delivers to a
  simple vectorized read (context for the GEMV figure, not a bound any BLAS reached).

Run at batch 1 and batched (tokens/s then counts every row's tokens). Decode tokens/s
counts the steps after the first new token (which comes from the
prompt's forward pass) and is timed from token timestamps (HF: a streamer). MBU =
(bytes of parameters and KV cache read per step) x tokens/s / GEMV bandwidth.
"""

from __future__ import annotations

import time
from typing import Dict, List

import torch

from benchmarks.harness import Samples, environment, interleaved, quick_config


class _Stamps:
    """An HF streamer that records when each new token arrives."""

    def __init__(self) -> None:
        self.times: List[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def bytes_per_step(config, max_len: int, batch: int, itemsize: int = 4) -> Dict[str, int]:
    """What one decode step reads: every weight (wte twice over is still once: the head
    reads all of it, the lookup one row) except wpe, of which it reads one row; and the
    whole static cache, keys and values of every layer."""
    from gptfn.params import num_params

    c = config.embed_dim
    params = (num_params(config) - config.context_length * c + c) * itemsize
    cache = 2 * config.num_layers * batch * max_len * c * itemsize
    return {"params": params, "cache": cache}


def bandwidth_probes(mib: int = 256):
    """Closures timing the GEMV kernel and a plain streaming read over ``mib`` MiB of fp32,
    and the bytes each reads."""
    import gptfn.cpu_gemv  # noqa: F401  (registers gptfn::gemv where OpenBLAS is there)

    cols = 768
    rows = mib * (1 << 20) // (4 * cols)
    w = torch.randn(rows, cols)
    x = torch.randn(1, cols)
    if gptfn.cpu_gemv.available():
        def gemv():
            torch.ops.gptfn.gemv(x, w, True)
    else:
        def gemv():
            torch.mv(w, x[0])

    def stream():
        w.sum()

    return gemv, stream, w.numel() * 4


def bench_decode(quick: bool, rounds: int, preset: str = "gpt2", prompt_len: int = 128,
                 new_tokens: int = 64, batch_size: int = 1, log=print) -> dict:
    import transformers

    from gptfn import GPTConfig, GPTModel
    from gptfn.generation import generate_tokens

    if quick:
        cfg = quick_config()
        prompt_len, new_tokens = 32, 16
    else:
        cfg = GPTConfig.from_preset(preset, dropout_rate=0.0)
    torch.manual_seed(0)
    model = GPTModel(cfg, seed=0).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_hf_dict())).eval()
    missing, unexpected = hf.transformer.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith(("attn.bias", "attn.masked_bias")) for k in missing):
        raise RuntimeError(f"HF model did not take gptfn's weights: {missing} {unexpected}")
    idx = torch.randint(0, cfg.vocab_size, (batch_size, prompt_len),
                        generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(idx)
    rates: Dict[str, List[float]] = {"hf": [], "eager": [], "compiled": []}
    tokens: Dict[str, torch.Tensor] = {}

    def run_ours(name: str, compile: bool):
        stamps, out = [], []
        with torch.no_grad():
            for tok in generate_tokens(model, idx, new_tokens, compile=compile):
                out.append(tok)
                stamps.append(time.perf_counter())
        rates[name].append(batch_size * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
        tokens[name] = torch.stack(out, 1)

    def run_hf():
        streamer = _Stamps()
        with torch.no_grad():
            out = hf.generate(idx, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              streamer=streamer)
        stamps = streamer.times[1:]  # the first put() is the prompt
        rates["hf"].append(batch_size * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
        tokens["hf"] = out[:, prompt_len:]

    gemv, stream, probe_bytes = bandwidth_probes(32 if quick else 256)
    log(f"decode: {preset if not quick else 'tiny'} fp32, batch {batch_size}, prompt {prompt_len}, "
        f"{new_tokens} new tokens, {rounds} interleaved rounds; compiling the decode step first")
    t0 = time.perf_counter()
    run_ours("compiled", True)  # compile outside the timed rounds
    compile_s = time.perf_counter() - t0
    log(f"  compile + first run: {compile_s:.1f} s")
    for v in rates.values():
        v.clear()
    variants = {
        "hf": run_hf,
        "eager": lambda: run_ours("eager", False),
        "compiled": lambda: run_ours("compiled", True),
        "gemv": gemv,
        "stream": stream,
    }
    samples = interleaved(variants, rounds=rounds, warmup=1, progress=lambda m: log(f"  {m}"))
    for v in rates.values():
        del v[0]  # the warm-up round
    if not (torch.equal(tokens["eager"], tokens["hf"]) and torch.equal(tokens["compiled"], tokens["hf"])):
        raise RuntimeError("gptfn's greedy tokens differ from HF transformers'")
    bandwidth = [probe_bytes / t for t in samples.times["gemv"]]  # bytes/s per round
    streaming = [probe_bytes / t for t in samples.times["stream"]]
    need = bytes_per_step(cfg, prompt_len + new_tokens, batch_size)
    step_bytes = need["params"] + need["cache"]
    per_round = Samples({k: [1.0 / r for r in v] for k, v in rates.items()})  # s per token
    rows = []
    for name in ("hf", "eager", "compiled"):
        r = sorted(rates[name])[len(rates[name]) // 2]
        steps = [rate / batch_size for rate in rates[name]]  # decode steps per second
        mbu = [step_bytes * st / bw for st, bw in zip(steps, bandwidth)]
        of_stream = [step_bytes * st / bw for st, bw in zip(steps, streaming)]
        rows.append({
            "variant": name,
            "tokens_per_s": r,
            "min_tokens_per_s": min(rates[name]),
            "max_tokens_per_s": max(rates[name]),
            "ratio_vs_hf": per_round.ratio(name, "hf"),
            "ratio_vs_eager": per_round.ratio(name, "eager"),
            "mbu": sorted(mbu)[len(mbu) // 2],
            "of_stream": sorted(of_stream)[len(of_stream) // 2],
        })
    bw_median = sorted(bandwidth)[len(bandwidth) // 2]
    stream_median = sorted(streaming)[len(streaming) // 2]
    table = "\n".join(
        ["| variant | decode tokens/s (median) | min-max | vs HF | vs eager | MBU (GEMV) "
         "| of streaming read |",
         "|---|---:|---:|---:|---:|---:|---:|"]
        + [f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['min_tokens_per_s']:.1f}-"
           f"{r['max_tokens_per_s']:.1f} | {r['ratio_vs_hf']:.2f}x | {r['ratio_vs_eager']:.2f}x | "
           f"{r['mbu'] * 100:.0f}% | {r['of_stream'] * 100:.0f}% |" for r in rows]
        + ["", f"GEMV bandwidth {bw_median / 1e9:.1f} GB/s, streaming read "
               f"{stream_median / 1e9:.1f} GB/s (medians); a decode step reads "
               f"{step_bytes / 1e6:.0f} MB (params {need['params'] / 1e6:.0f} MB + KV cache "
               f"{need['cache'] / 1e6:.0f} MB); decode-step compile + first run {compile_s:.1f} s"]
    )
    return {
        "workload": "decode" if batch_size == 1 else f"decode_b{batch_size}",
        "config": cfg.to_dict(),
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "decode_tokens_per_s": rates,
        "samples_s": samples.times,
        "gemv_bytes": probe_bytes,
        "gemv_bandwidth_bytes_per_s": bandwidth,
        "stream_bandwidth_bytes_per_s": streaming,
        "bytes_per_step": need,
        "compile_s": compile_s,
        "rows": rows,
        "environment": environment(),
        "table": table,
    }
