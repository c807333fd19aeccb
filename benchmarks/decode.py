"""Decode workload: tokens/s of greedy generation against HF transformers.

Variants, same weights, dtype and prompt, interleaved in rounds after a warm-up:

- ``hf``: HF transformers' ``GPT2LMHeadModel.generate`` (sdpa attention, dynamic cache),
  the peer;
- ``hf_compiled``: the same with ``cache_implementation="static"``, which makes HF compile
  its forward (``torch.compile``, mode reduce-overhead: CUDA graphs). On by default on CUDA;
  ``--hf-compiled`` adds it on the CPU (mode default there);
- ``eager``: ``gptfn.generate`` (static KV cache, functional core);
- ``compiled``: the same with ``compile=True`` (decode step compiled: on the CPU through
  gptfn's kernels, ``gptfn.kernels.route``; CUDA graphs on CUDA; compile time is measured
  apart, before the rounds);
- ``eager_bf16``, ``compiled_bf16``, ``eager_int8``, ``compiled_int8``, ``eager_int4``,
  ``compiled_int4`` (CPU, fp32 runs): the same model in a weight format
  (``gptfn.quantize``); generation runs its decode step through gptfn's kernels
  (``gptfn.kernels.route``), as captured or compiled by inductor;
- ``aoti``, ``aoti_bf16``, ``aoti_int8``, ``aoti_int4`` (CPU, fp32 runs, batch 1;
  ``--quick``: int8 only): the AOTInductor package of each of those models
  (``export.aoti``: its forward program prefills, its decode program steps, through gptfn's
  kernels), built before the rounds (its time is reported with the compile times);
- ``gemv``: a matrix-vector product (``torch.mv``) over a 256 MiB matrix (1 GiB on CUDA)
  with rows of 768 at the run's dtype, measured in the same rounds;
- ``stream``: a plain sum over the same matrix: what the memory system delivers to a
  simple vectorized read;
- the peers (``benchmarks.peers``, on the CPU): llama.cpp on gptfn's GGUF export (f32,
  f16, q8_0, q4_0) and ONNX Runtime on its ONNX export (fp32, int8), each in its own process
  with gptfn's thread count, timed by its own token timestamps; batched, llama.cpp decodes the
  rows as sequences of one batch (ONNX Runtime runs at batch 1 only); the report matches
  gptfn's faster path at each precision with llama.cpp's (``against_llama_cpp``).

On the CPU gptfn's weights (which HF's model shares), the packages' and the probes' matrix
are placed in 2 MB pages (``gptfn.huge_pages``, ``export.aoti.load(huge_pages=True)``), as
a caller who decodes places them; the peers load their files as they do for a user.

Run at batch 1 and batched (tokens/s then counts every row's tokens). Decode tokens/s
counts the steps after the first new token (which comes from the prompt's forward pass),
timed from token timestamps (HF: a streamer) on the device's clock (CUDA events on a GPU).
MBU = (bytes of parameters and KV cache read per step) x steps/s / bandwidth, where the
bandwidth is the GEMV probe's on the CPU and the datasheet's on CUDA (``benchmarks.device``).
"""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from benchmarks.device import Clock, Target, per_round
from benchmarks.harness import (Samples, environment, hf_peer, interleaved, quick_config,
                                relative_error)
from benchmarks.peers import (CACHE_BYTES, FORMATS, PEERS, PRECISIONS, WEIGHT_BYTES, PeerFiles,
                              fp32_params, missing, peer_engines)


class _Stamps:
    """An HF streamer that stamps each new token on the device's clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.times: List[object] = []

    def put(self, value) -> None:
        self.times.append(self.clock.stamp())

    def end(self) -> None:
        pass


def bytes_per_step(config, max_len: int, batch: int, itemsize: float = 4,
                   cache_itemsize: Optional[float] = None) -> Dict[str, int]:
    """What one decode step reads: every weight (wte twice over is still once: the head
    reads all of it, the lookup one row) except wpe, of which it reads one row; and the
    whole static cache, keys and values of every layer (``cache_itemsize`` bytes a value;
    default: ``itemsize``)."""
    from gptfn.params import num_params

    c = config.embed_dim
    cache_itemsize = itemsize if cache_itemsize is None else cache_itemsize
    params = int((num_params(config) - config.context_length * c + c) * itemsize)
    cache = int(2 * config.num_layers * batch * max_len * c * cache_itemsize)
    return {"params": params, "cache": cache}


def bandwidth_probes(target: Target, mib: int = 256):
    """Closures timing a matrix-vector product (``torch.mv``, the BLAS route of a plain
    model's one-row products) and a plain streaming read over ``mib`` MiB at the target's
    dtype and device, and the bytes each reads."""
    from gptfn.hugepages import place

    cols = 768
    itemsize = target.dtype.itemsize
    rows = mib * (1 << 20) // (itemsize * cols)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=gen).to(target.device, target.dtype)
    w = place({"w": w})["w"]  # in 2 MB pages on the CPU, as gptfn's weights in decode
    x = torch.randn(1, cols, generator=gen).to(target.device, target.dtype)

    def gemv():
        torch.mv(w, x[0])

    def stream():
        w.sum()

    return gemv, stream, w.numel() * itemsize


def format_bytes(model, config) -> int:
    """Bytes of parameters a decode step of ``model`` reads, in its own format: every
    tensor (scales included) except ``wpe``, of which one row."""
    from gptfn.modules import params_of

    params = params_of(model)
    total = sum(t.numel() * t.element_size() for k, t in params.items() if k != "wpe.weight")
    wpe = params["wpe.weight"]
    return total + wpe.size(1) * wpe.element_size()


def _hf_compile_kwargs(target: Target) -> dict:
    """generate() arguments for HF's static cache + torch.compile path (auto-compiled on
    CUDA with CUDA graphs; on the CPU only when asked, so it is asked, in mode default)."""
    from transformers import CompileConfig

    if target.is_cuda:
        return {"cache_implementation": "static"}
    config = CompileConfig(mode="default")
    config._compile_all_devices = True  # HF's switch for compiling off accelerators
    return {"cache_implementation": "static", "compile_config": config}


def bench_decode(quick: bool, rounds: int, preset: str = "gpt2", prompt_len: int = 128,
                 new_tokens: int = 64, batch_size: int = 1, target: Optional[Target] = None,
                 hf_compiled: Optional[bool] = None, peers: Sequence[str] = (),
                 peer_files: Optional[PeerFiles] = None, precisions: Sequence[str] = PRECISIONS,
                 log=print) -> dict:
    """The decode workload. ``precisions``: which of gptfn's (fp32, bf16, int8, int4) run
    beside eager fp32 and HF, which always run (the references); a run of fewer needs less
    memory, which GPT-2 XL does."""
    from gptfn import GPTConfig, GPTModel
    from gptfn.generation import generate_tokens
    from gptfn.hugepages import huge_pages

    target = target or Target.parse()
    hf_compiled = target.is_cuda if hf_compiled is None else hf_compiled
    if quick:
        cfg = quick_config()
        prompt_len, new_tokens = 32, 16
    else:
        cfg = GPTConfig.from_preset(preset, dropout_rate=0.0)
    torch.manual_seed(0)

    def placed(m):  # on the CPU gptfn's weights stream from 2 MB pages (gptfn.hugepages)
        return m if target.is_cuda else huge_pages(m)

    model = placed(GPTModel(cfg, seed=0).eval())
    hf = hf_peer(cfg, model, target, share=True)  # HF reads the same tensors
    params32 = fp32_params(model) if peers else {}  # what the peers' files are written from
    if target.is_cuda or target.dtype != torch.float32:  # new tensors: placed again
        model = placed(model.to(device=target.device, dtype=target.dtype))
    idx = torch.randint(0, cfg.vocab_size, (batch_size, prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(target.device)
    mask = torch.ones_like(idx)
    clock = target.clock()
    plain = "fp32" in precisions or target.dtype != torch.float32
    ours = ["hf"] + (["hf_compiled"] if hf_compiled else []) + ["eager"] \
        + (["compiled"] if plain else [])
    models = {"eager": model, **({"compiled": model} if plain else {})}
    if not target.is_cuda and target.dtype == torch.float32:  # weight formats: CPU, fp32 compute
        from gptfn.quantization import quantize

        for scheme in (f for f in FORMATS if f in precisions):
            quantized = placed(quantize(model, scheme))
            models.update({f"eager_{scheme}": quantized, f"compiled_{scheme}": quantized})
    formats = [name for name in models if name not in ("eager", "compiled")]
    # AOTInductor packages: batch 1, CPU, fp32 compute (their decode program's), of each model
    sources, packages = {}, {}
    if not target.is_cuda and target.dtype == torch.float32 and batch_size == 1:
        sources = {"aoti" + name[len("eager"):]: models[name] for name in models
                   if name.startswith("eager") and (not quick or name == "eager_int8")
                   and (name != "eager" or plain)}
        # (--quick, in the test suite: the int8 package only; each costs half a minute)
    built_s, unbuilt = {}, {}
    for name in list(sources):
        why = _no_room_for_package(format_bytes(sources[name], cfg))
        if why:
            unbuilt[name] = why
            del sources[name]
            log(f"  {name} left out: {why}")
    if sources and peer_files is not None:
        # the peers' files before the packages: writing one holds a copy of the weights,
        # which beside a loaded package did not fit (GPT-2 XL in fp32, 24 GB)
        for name in [n for n in peers if n not in missing([n])]:
            peer_files.path(name, cfg, params32)
    for name, source in sources.items():  # before the peers start: a build's peak memory
        t0 = time.perf_counter()
        log(f"  {name}: building the AOTInductor package")
        packages[name] = _package(source, prompt_len + new_tokens)
        built_s[name] = time.perf_counter() - t0
    off = "peers run on the CPU" if target.is_cuda else None
    # batched, each row is its own sequence in llama.cpp's batch (Engine.greedy_rows);
    # ONNX Runtime is driven one row at a time
    unbatched = {n: "ONNX Runtime runs at batch 1 here" for n in peers
                 if batch_size != 1 and PEERS[n][0] != "llama.cpp" and not off}
    with peer_engines([n for n in peers if n not in unbatched], peer_files, cfg, params32,
                      torch.get_num_threads(), off, log) as (engines, skipped):
        skipped.update(unbatched)
        names = ours + formats + list(sources) + list(engines)
        rates: Dict[str, List[float]] = {name: [] for name in names}
        tokens: Dict[str, torch.Tensor] = {}

        def rate(stamps) -> float:
            return batch_size * (len(stamps) - 1) / clock.seconds(stamps[0], stamps[-1])

        def run_ours(name: str):
            stamps, out = [], []
            compile = name.startswith("compiled")
            with torch.no_grad():
                for tok in generate_tokens(models[name], idx, new_tokens, compile=compile):
                    out.append(tok)
                    stamps.append(clock.stamp())
            rates[name].append(rate(stamps))
            tokens[name] = torch.stack(out, 1).cpu()

        def run_package(name: str):
            stamps, out = [], []
            with torch.no_grad():
                for tok in packages[name].tokens(idx, new_tokens):
                    out.append(tok.view(-1))
                    stamps.append(clock.stamp())
            rates[name].append(rate(stamps))
            tokens[name] = torch.stack(out, 1).cpu()

        def run_peer(name: str):
            if batch_size == 1:
                out, stamps = engines[name].greedy(idx[0].tolist(), new_tokens)
                out = [out]
            else:
                out, stamps = engines[name].greedy_rows(idx.tolist(), new_tokens)
            # the engine's own clock (perf_counter seconds), not the target's
            rates[name].append(batch_size * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
            tokens[name] = torch.tensor(out)

        def run_hf(name: str, extra: dict):
            streamer = _Stamps(clock)
            with torch.no_grad():
                out = hf.generate(idx, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                  streamer=streamer, **extra)
            rates[name].append(rate(streamer.times[1:]))  # the first put() is the prompt
            tokens[name] = out[:, prompt_len:].cpu()

        gemv, stream, probe_bytes = bandwidth_probes(target, 32 if quick else
                                                     (1024 if target.is_cuda else 256))
        log(f"decode: {preset if not quick else 'tiny'} on {target.describe()}, "
            f"batch {batch_size}, prompt {prompt_len}, {new_tokens} new tokens, "
            f"{rounds} interleaved rounds; compiling first")
        compile_s = {}
        static = _hf_compile_kwargs(target) if hf_compiled else {}
        firsts = [(name, lambda name=name: run_ours(name)) for name in models
                  if name.startswith("compiled")]
        firsts.append(("hf_compiled", lambda: run_hf("hf_compiled", static)))
        firsts += [(name, lambda name=name: run_package(name)) for name in sources]
        for name, first in firsts:
            if name in rates:
                t0 = time.perf_counter()
                first()  # compile outside the timed rounds
                compile_s[name] = time.perf_counter() - t0 + built_s.get(name, 0.0)
                log(f"  {name}: compile + first run {compile_s[name]:.1f} s")
        variants = {
            "hf": lambda: run_hf("hf", {}),
            "hf_compiled": lambda: run_hf("hf_compiled", static),
            **{name: (lambda name=name: run_ours(name)) for name in models},
            **{name: (lambda name=name: run_package(name)) for name in sources},
            "gemv": gemv,
            "stream": stream,
            **{name: (lambda name=name: run_peer(name)) for name in engines},
        }
        variants = {k: v for k, v in variants.items() if k in rates or k in ("gemv", "stream")}
        for v in rates.values():
            v.clear()
        samples = interleaved(variants, rounds=rounds, warmup=1, clock=clock,
                              progress=lambda m: log(f"  {m}"))
        for v in rates.values():
            del v[0]  # the warm-up round
        agreement = _agreement(cfg, model, hf, idx, tokens, target,
                               strict=ours + [n for n in sources if n == "aoti"])
        bandwidth = [probe_bytes / t for t in samples.times["gemv"]]  # bytes/s per round
        streaming = [probe_bytes / t for t in samples.times["stream"]]
        spec_bandwidth, _ = target.spec()
        roofline = per_round(spec_bandwidth, probe_bytes, samples.times["gemv"])
        roofline_name = "datasheet" if spec_bandwidth else "GEMV"
        need = bytes_per_step(cfg, prompt_len + new_tokens, batch_size, target.dtype.itemsize)
        step_bytes = need["params"] + need["cache"]
        reads = {name: step_bytes for name in ours}  # bytes a step reads, by variant
        for name in formats:
            reads[name] = format_bytes(models[name], cfg) + need["cache"]
        for name, source in sources.items():
            reads[name] = (format_bytes(source, cfg) if name != "aoti" else need["params"]) \
                + need["cache"]
        for name in engines:
            engine, precision = PEERS[name]
            peer = bytes_per_step(cfg, prompt_len + new_tokens, batch_size,
                                  WEIGHT_BYTES[precision], CACHE_BYTES[engine])
            reads[name] = peer["params"] + peer["cache"]
        per_token = Samples({k: [1.0 / r for r in v] for k, v in rates.items()})  # s per token
        rows = []
        for name in names:
            steps = [r / batch_size for r in rates[name]]  # decode steps per second
            mbu = [reads[name] * st / bw for st, bw in zip(steps, roofline)]
            of_stream = [reads[name] * st / bw for st, bw in zip(steps, streaming)]
            rows.append({
                "variant": name,
                "tokens_per_s": statistics.median(rates[name]),
                "ms_per_token": 1e3 / statistics.median(steps),
                "min_tokens_per_s": min(rates[name]),
                "max_tokens_per_s": max(rates[name]),
                "ratio_vs_hf": per_token.ratio(name, "hf"),
                "ratio_vs_eager": per_token.ratio(name, "eager"),
                "mb_per_token": reads[name] / 1e6,
                "mbu": statistics.median(mbu),
                "of_stream": statistics.median(of_stream),
            })
        against = _against_llama_cpp(rates, per_token, target.dtype_name)
        bw_median = statistics.median(bandwidth)
        stream_median = statistics.median(streaming)
        roof = (f"MBU against the datasheet's {spec_bandwidth / 1e9:.0f} GB/s" if spec_bandwidth
                else "MBU against the GEMV probe")
        table = "\n".join(
            [f"| variant | decode tokens/s (median) | ms/step | min-max | vs HF | vs eager "
             f"| MB read/step | MBU ({roofline_name}) | of streaming read |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            + [f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.2f} | "
               f"{r['min_tokens_per_s']:.1f}-{r['max_tokens_per_s']:.1f} | "
               f"{r['ratio_vs_hf']:.2f}x | {r['ratio_vs_eager']:.2f}x | "
               f"{r['mb_per_token']:.0f} | {r['mbu'] * 100:.0f}% | "
               f"{r['of_stream'] * 100:.0f}% |"
               for r in rows]
            + ["", f"{target.describe()}; {roof}. GEMV bandwidth {bw_median / 1e9:.1f} GB/s, "
                   f"streaming read {stream_median / 1e9:.1f} GB/s (medians); a decode step reads "
                   f"{step_bytes / 1e6:.0f} MB (params {need['params'] / 1e6:.0f} MB + KV cache "
                   f"{need['cache'] / 1e6:.0f} MB); compile + first run: "
                   + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items())
                   + f"; {agreement['summary']}"
                   + ("; peers left out: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())
                      if skipped else "")
                   + ("; packages left out: " + "; ".join(f"{k} ({v})" for k, v in
                                                         unbuilt.items()) if unbuilt else "")]
            + (["", "gptfn's faster path at each precision against llama.cpp at its own "
                    "(median of per-round ratios):", "",
                "| precision | gptfn | tokens/s | llama.cpp | tokens/s | gptfn / llama.cpp |",
                "|---|---|---:|---|---:|---:|"]
               + [f"| {a['precision']} | {a['gptfn']} | {a['gptfn_tokens_per_s']:.1f} | "
                  f"{a['peer']} | {a['peer_tokens_per_s']:.1f} | {a['ratio']:.2f}x |"
                  for a in against] if against else [])
        )
        return {
            "workload": "decode" if batch_size == 1 else f"decode_b{batch_size}",
            "config": cfg.to_dict(),
            "device": str(target.device),
            "dtype": target.dtype_name,
            "batch_size": batch_size,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "rounds": rounds,
            "decode_tokens_per_s": rates,
            "samples_s": samples.times,
            "gemv_bytes": probe_bytes,
            "gemv_bandwidth_bytes_per_s": bandwidth,
            "stream_bandwidth_bytes_per_s": streaming,
            "spec_bandwidth_bytes_per_s": spec_bandwidth,
            "bytes_per_step": need,
            "compile_s": compile_s,
            "agreement": agreement,
            "peers_left_out": skipped,
            "packages_left_out": unbuilt,
            "rows": rows,
            "against_llama_cpp": against,
            "environment": environment(),
            "table": table,
        }


# precision -> (gptfn's variants at it, llama.cpp's variant at the nearest precision)
_MATCHES = {"fp32": ("", "llama.cpp-f32"), "bf16": ("_bf16", "llama.cpp-f16"),
            "int8": ("_int8", "llama.cpp-q8_0"), "int4": ("_int4", "llama.cpp-q4_0")}


def _no_room_for_package(weight_bytes: int) -> Optional[str]:
    """Why this machine has too little memory to build and run a package of ``weight_bytes``
    of weights beside the other variants and the peers (None: it has enough, or the memory
    cannot be read). The loaded package holds its own copy of the weights, and its build
    less than one more at its peak (``tests/test_export.py`` holds it to that)."""
    need = 2 * weight_bytes
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    if need <= available:
        return None
    return (f"building it needs about {need / 1e9:.0f} GB of memory, "
            f"{available / 1e9:.0f} GB available")


def _package(model, max_seq_len: int):
    """``model``'s AOTInductor package (``export.aoti``), built and loaded."""
    import tempfile
    from pathlib import Path

    from export.aoti import load, package
    from gptfn.generation import model_parts

    config, params = model_parts(model)
    with tempfile.TemporaryDirectory(prefix="gptfn-decode-") as tmp:
        path = Path(tmp) / "package.pt2"
        package(config, params, max_seq_len, path)
        return load(path, huge_pages=True)


def _against_llama_cpp(rates: Dict[str, List[float]], per_token: Samples,
                       dtype_name: str) -> List[dict]:
    """For each precision where both ran: gptfn's fastest variant (eager, compiled or its
    AOTInductor package, by median) against llama.cpp's, as the median of per-round speed
    ratios. The plain variants run at the run's dtype (fp32 on the CPU by default)."""
    out = []
    for precision, (suffix, peer) in _MATCHES.items():
        if suffix == "":
            precision = dtype_name
            peer = "llama.cpp-f32" if dtype_name == "fp32" else "llama.cpp-f16"
        ours = [n for n in (f"eager{suffix}", f"compiled{suffix}", f"aoti{suffix}")
                if rates.get(n)]
        if not ours or not rates.get(peer):
            continue
        best = max(ours, key=lambda n: statistics.median(rates[n]))
        out.append({"precision": precision, "gptfn": best, "peer": peer,
                     "gptfn_tokens_per_s": statistics.median(rates[best]),
                     "peer_tokens_per_s": statistics.median(rates[peer]),
                     "ratio": per_token.ratio(best, peer)})
    return out


def _agreement(cfg, model, hf, idx, tokens, target: Target, strict=()) -> dict:
    """Check that every variant in ``strict`` (gptfn's and HF's) computed the same thing as
    HF, or raise; the others' (the peers') share of tokens equal to HF's is reported.

    fp32: the greedy tokens are equal. bf16/fp16: rounding differs between the two
    libraries' kernels and a random model's logits are close together, so greedy paths may
    part; the check is on the prompt's last logits instead (relative error under 3e-2),
    and the share of tokens equal to HF's is reported.
    """
    from gptfn import KVCache
    from gptfn.generation import model_parts
    from gptfn.kv_cache import prefill

    _, params = model_parts(model)
    with torch.no_grad():
        cache = KVCache.create(cfg, idx.size(0), idx.size(1), dtype=target.dtype,
                               device=target.device)
        ours = prefill(params, idx, cache, cfg)[0].float()
        theirs = hf(idx, logits_to_keep=1).logits[:, -1].float()
    error = relative_error(ours, theirs)
    same = {k: float((v == tokens["hf"]).float().mean()) for k, v in tokens.items() if k != "hf"}
    held = [v for k, v in same.items() if k in strict]
    if target.dtype == torch.float32:
        if error > 1e-4 or min(held, default=1.0) < 1.0:
            raise RuntimeError(f"gptfn and HF disagree in fp32: logits relative error {error:.2e}, "
                               f"share of equal greedy tokens {same}")
    elif error > 3e-2:
        raise RuntimeError(f"gptfn and HF disagree in {target.dtype_name}: last logits' relative "
                           f"error {error:.2e} > 3e-2")
    summary = (f"last-logits relative error vs HF {error:.1e}; greedy tokens equal to HF's: "
               + ", ".join(f"{k} {v * 100:.0f}%" for k, v in same.items()))
    return {"logits_relative_error": error, "tokens_equal_to_hf": same, "summary": summary}
