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
from functools import partial
from types import SimpleNamespace
from typing import Callable, Dict, Iterable, List, Optional

import torch

from benchmarks.device import Clock, Target, per_round
from benchmarks.harness import (Samples, hf_peer, interleaved, left_out, markdown, model_config,
                                relative_error, result, workload)
from benchmarks.peers import (CACHE_BYTES, FORMATS, PEERS, WEIGHT_BYTES, fp32_params, missing,
                              peer_engines)

HOST = Clock("cpu")  # the peers' token stamps: perf_counter seconds in their own process


@workload("decode")
def run_decode(opts) -> Iterable[dict]:
    """At batch 1, then batched (``--batch-size``; 8, 4 with --quick), unless
    ``--batch-size 1``: the batched run would be the first again."""
    yield bench_decode(opts, 1)
    if opts.batch_size != 1:
        torch._dynamo.reset()  # the batched run compiles cold too, as in a process of its own
        yield bench_decode(opts, opts.batch_size or (4 if opts.quick else 8))


def _rate(stamps: list, clock: Clock, rows: int) -> float:
    """Tokens/s of a generation's steps after its first new token (which comes from the
    prompt's forward pass), from the new tokens' stamps on ``clock``."""
    return rows * (len(stamps) - 1) / clock.seconds(stamps[0], stamps[-1])


def _gptfn_tokens(tokens: Callable[[], Iterable[torch.Tensor]], clock: Clock):
    """One generation by gptfn (``generate_tokens``) or a package (``.tokens``), each new token
    stamped on ``clock``: (tokens/s, the (B, new) tokens)."""
    stamps, out = [], []
    with torch.no_grad():
        for tok in tokens():
            out.append(tok.view(-1))
            stamps.append(clock.stamp())
    return _rate(stamps, clock, out[0].numel()), torch.stack(out, 1).cpu()


def _hf_tokens(hf, idx, mask, new_tokens: int, clock: Clock, extra: dict):
    """One generation by HF's ``generate`` (``extra``: its static cache + compile), each new
    token stamped by a streamer: (tokens/s, the (B, new) tokens)."""
    stamps: List[object] = []
    streamer = SimpleNamespace(put=lambda _: stamps.append(clock.stamp()), end=lambda: None)
    with torch.no_grad():
        out = hf.generate(idx, attention_mask=mask, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                          streamer=streamer, **extra)
    rate = _rate(stamps[1:], clock, idx.size(0))  # the first put() is the prompt
    return rate, out[:, idx.size(1):].cpu()


def _peer_tokens(engine, idx, new_tokens: int):
    """One generation by a peer's engine (batched: its rows as sequences of one batch), timed
    by its own token stamps: (tokens/s, the (B, new) tokens)."""
    if idx.size(0) == 1:
        out, stamps = engine.greedy(idx[0].tolist(), new_tokens)
        out = [out]
    else:
        out, stamps = engine.greedy_rows(idx.tolist(), new_tokens)
    return _rate(stamps, HOST, idx.size(0)), torch.tensor(out)


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


def bandwidth_probes(target: Target, mib: int):
    """Calls timing a matrix-vector product (``torch.mv``, the BLAS route of a plain model's
    one-row products) and a plain streaming read over ``mib`` MiB at the target's dtype and
    device, and the bytes each reads."""
    from gptfn.hugepages import place

    cols = 768
    rows = mib * (1 << 20) // (target.dtype.itemsize * cols)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=gen).to(target.device, target.dtype)
    w = place({"w": w})["w"]  # in 2 MB pages on the CPU, as gptfn's weights in decode
    x = torch.randn(1, cols, generator=gen).to(target.device, target.dtype)

    def gemv():
        torch.mv(w, x[0])

    def stream():
        w.sum()

    return gemv, stream, w.numel() * target.dtype.itemsize


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


def bench_decode(opts, batch_size: int) -> dict:
    """One decode run at ``batch_size``. ``opts.precisions``: which of gptfn's (fp32, bf16,
    int8, int4) run beside eager fp32 and HF, which always run (the references); a run of
    fewer needs less memory, which GPT-2 XL does."""
    from gptfn import GPTModel
    from gptfn.generation import generate_tokens
    from gptfn.hugepages import huge_pages

    target, quick, peers = opts.target, opts.quick, opts.peers
    cfg = model_config(opts)
    prompt_len, new_tokens = (32, 16) if quick else (128, 64)
    cpu32 = not target.is_cuda and target.dtype == torch.float32  # formats' and packages' home
    torch.manual_seed(0)

    def placed(m):  # on the CPU gptfn's weights stream from 2 MB pages (gptfn.hugepages)
        return m if target.is_cuda else huge_pages(m)

    model = placed(GPTModel(cfg, seed=0).eval())
    hf = hf_peer(cfg, model, target, share=True)  # HF reads the same tensors
    params32 = fp32_params(model) if peers else {}  # what the peers' files are written from
    if not cpu32:  # new tensors: placed again
        model = placed(model.to(device=target.device, dtype=target.dtype))
    idx = torch.randint(0, cfg.vocab_size, (batch_size, prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(target.device)
    clock = target.clock()
    plain = "fp32" in opts.precisions or target.dtype != torch.float32
    models = {"eager": model, **({"compiled": model} if plain else {})}
    if cpu32:  # the weight formats compute in fp32 on the CPU
        from gptfn.quantization import quantize

        for scheme in (f for f in FORMATS if f in opts.precisions):
            quantized = placed(quantize(model, scheme))
            models.update({f"eager_{scheme}": quantized, f"compiled_{scheme}": quantized})
    # AOTInductor packages (batch 1; --quick, in the test suite: the int8 package only, each
    # costs half a minute): of each eager model, where there is the memory to build it
    sources, unbuilt = {}, {}
    if cpu32 and batch_size == 1:
        for name in (n for n in models if n.startswith("eager")
                     and (not quick or n == "eager_int8") and (n != "eager" or plain)):
            aoti, why = "aoti" + name[len("eager"):], _no_room_for_package(
                format_bytes(models[name], cfg))
            if why:
                unbuilt[aoti] = why
                print(f"  {aoti} left out: {why}")
            else:
                sources[aoti] = models[name]
    if sources:
        # the peers' files before the packages: writing one holds a copy of the weights,
        # which beside a loaded package did not fit (GPT-2 XL in fp32, 24 GB)
        for name in [n for n in peers if n not in missing([n])]:
            opts.peer_files.path(name, cfg, params32)
    packages, built_s = {}, {}
    for name, source in sources.items():  # before the peers start: a build's peak memory
        t0 = time.perf_counter()
        print(f"  {name}: building the AOTInductor package")
        packages[name] = _package(source, prompt_len + new_tokens)
        built_s[name] = time.perf_counter() - t0
    off = "peers run on the CPU" if target.is_cuda else None
    # batched, each row is its own sequence in llama.cpp's batch (Engine.greedy_rows);
    # ONNX Runtime is driven one row at a time
    unbatched = {n: "ONNX Runtime runs at batch 1 here" for n in peers
                 if batch_size != 1 and PEERS[n][0] != "llama.cpp" and not off}
    hf_compiled = opts.hf_compiled or target.is_cuda
    static = _hf_compile_kwargs(target) if hf_compiled else {}
    mib = 32 if quick else (1024 if target.is_cuda else 256)
    with peer_engines([n for n in peers if n not in unbatched], opts.peer_files, cfg, params32,
                      torch.get_num_threads(), off) as (engines, skipped):
        skipped.update(unbatched)
        mask = torch.ones_like(idx)
        variants = {"hf": partial(_hf_tokens, hf, idx, mask, new_tokens, clock, {})}
        if hf_compiled:
            variants["hf_compiled"] = partial(_hf_tokens, hf, idx, mask, new_tokens, clock, static)
        for name, m in models.items():
            variants[name] = partial(_gptfn_tokens, partial(
                generate_tokens, m, idx, new_tokens, compile=name.startswith("compiled")), clock)
        for name, package in packages.items():
            variants[name] = partial(_gptfn_tokens, partial(package.tokens, idx, new_tokens),
                                     clock)
        names = list(variants) + list(engines)  # the decoders, in the report's order
        variants["gemv"], variants["stream"], probe_bytes = bandwidth_probes(target, mib)
        variants.update({name: partial(_peer_tokens, e, idx, new_tokens)
                         for name, e in engines.items()})
        print(f"decode: {opts.model if not quick else 'tiny'} on {target.describe()}, "
              f"batch {batch_size}, prompt {prompt_len}, {new_tokens} new tokens, "
              f"{opts.rounds} interleaved rounds; compiling first")
        compile_s = {}
        for name in ([n for n in models if n.startswith("compiled")]
                     + (["hf_compiled"] if hf_compiled else []) + list(packages)):
            t0 = time.perf_counter()
            variants[name]()  # compile outside the timed rounds
            compile_s[name] = time.perf_counter() - t0 + built_s.get(name, 0.0)
            print(f"  {name}: compile + first run {compile_s[name]:.1f} s")
        samples = interleaved(variants, rounds=opts.rounds, warmup=1, clock=clock,
                              progress=lambda m: print(f"  {m}"), keep=True)
    rates = {name: [rate for rate, _ in samples.values[name]] for name in names}
    tokens = {name: samples.values[name][-1][1] for name in names}
    agreement = _agreement(cfg, model, hf, idx, tokens, target,
                           strict=[n for n in names if n in ("hf", "hf_compiled", "eager",
                                                             "compiled", "aoti")])
    need = bytes_per_step(cfg, prompt_len + new_tokens, batch_size, target.dtype.itemsize)
    reads = {name: need["params"] + need["cache"] for name in names}  # bytes a step reads
    for name, m in {**models, **sources}.items():
        reads[name] = (need["params"] if m is model else format_bytes(m, cfg)) + need["cache"]
    for name in engines:
        engine, precision = PEERS[name]
        peer = bytes_per_step(cfg, prompt_len + new_tokens, batch_size,
                              WEIGHT_BYTES[precision], CACHE_BYTES[engine])
        reads[name] = peer["params"] + peer["cache"]
    gemv = [probe_bytes / t for t in samples.times["gemv"]]  # bytes/s per round
    streaming = [probe_bytes / t for t in samples.times["stream"]]
    spec_bandwidth, _ = target.spec()
    roofline = per_round(spec_bandwidth, probe_bytes, samples.times["gemv"])
    per_token = Samples({k: [1.0 / r for r in v] for k, v in rates.items()})  # s per token
    rows = []
    for name in names:
        steps = [r / batch_size for r in rates[name]]  # decode steps per second
        rows.append({
            "variant": name,
            "tokens_per_s": statistics.median(rates[name]),
            "ms_per_token": 1e3 / statistics.median(steps),
            "min_tokens_per_s": min(rates[name]),
            "max_tokens_per_s": max(rates[name]),
            "ratio_vs_hf": per_token.ratio(name, "hf"),
            "ratio_vs_eager": per_token.ratio(name, "eager"),
            "mb_per_token": reads[name] / 1e6,
            "mbu": statistics.median(reads[name] * s / b for s, b in zip(steps, roofline)),
            "of_stream": statistics.median(reads[name] * s / b for s, b in zip(steps, streaming)),
        })
    against = _against_llama_cpp(rates, per_token, target.dtype_name)
    roof = (f"MBU against the datasheet's {spec_bandwidth / 1e9:.0f} GB/s" if spec_bandwidth
            else "MBU against the GEMV probe")
    table = markdown([
        ("variant", "{variant}"), ("decode tokens/s (median)", "{tokens_per_s:.1f}"),
        ("ms/step", "{ms_per_token:.2f}"),
        ("min-max", "{min_tokens_per_s:.1f}-{max_tokens_per_s:.1f}"),
        ("vs HF", "{ratio_vs_hf:.2f}x"), ("vs eager", "{ratio_vs_eager:.2f}x"),
        ("MB read/step", "{mb_per_token:.0f}"),
        (f"MBU ({'datasheet' if spec_bandwidth else 'GEMV'})", "{mbu:.0%}"),
        ("of streaming read", "{of_stream:.0%}")], rows)
    table += ["", f"{target.describe()}; {roof}. GEMV bandwidth "
                  f"{statistics.median(gemv) / 1e9:.1f} GB/s, streaming read "
                  f"{statistics.median(streaming) / 1e9:.1f} GB/s (medians); a decode step reads "
                  f"{(need['params'] + need['cache']) / 1e6:.0f} MB (params "
                  f"{need['params'] / 1e6:.0f} MB + KV cache {need['cache'] / 1e6:.0f} MB); "
                  "compile + first run: "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items())
                  + f"; {agreement['summary']}" + left_out("peers", skipped)
                  + left_out("packages", unbuilt)]
    if against:
        table += ["", "gptfn's faster path at each precision against llama.cpp at its own "
                      "(median of per-round ratios):", ""]
        table += markdown([("precision", "{precision}"), ("gptfn", "{gptfn}"),
                           ("tokens/s", "{gptfn_tokens_per_s:.1f}"), ("llama.cpp", "{peer}"),
                           ("tokens/s", "{peer_tokens_per_s:.1f}"),
                           ("gptfn / llama.cpp", "{ratio:.2f}x")], against)
    return result(
        "decode" if batch_size == 1 else f"decode_b{batch_size}", table, target, cfg,
        batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens,
        rounds=opts.rounds, decode_tokens_per_s=rates, samples_s=samples.times,
        gemv_bytes=probe_bytes, gemv_bandwidth_bytes_per_s=gemv,
        stream_bandwidth_bytes_per_s=streaming, spec_bandwidth_bytes_per_s=spec_bandwidth,
        bytes_per_step=need, compile_s=compile_s, agreement=agreement, peers_left_out=skipped,
        packages_left_out=unbuilt, rows=rows, against_llama_cpp=against)


def _no_room_for_package(weight_bytes: int) -> Optional[str]:
    """Why this machine has too little memory to build and run a package of ``weight_bytes``
    of weights beside the other variants and the peers (None: it has enough, or the memory
    cannot be read). The loaded package holds its own copy of the weights. Its build holds
    less than one more at its peak for weights with storages of their own
    (``tests/test_export.py`` holds it there), and up to about 1.4x beyond the model for
    weights placed in 2 MB pages (views, which the build copies), freed before the package
    is loaded."""
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
    AOTInductor package, by median) against llama.cpp's at the nearest precision, as the
    median of per-round speed ratios. The plain variants run at the run's dtype (fp32 on the
    CPU by default)."""
    out = []
    for suffix, (precision, peer) in {
            "": (dtype_name, "llama.cpp-f32" if dtype_name == "fp32" else "llama.cpp-f16"),
            "_bf16": ("bf16", "llama.cpp-f16"), "_int8": ("int8", "llama.cpp-q8_0"),
            "_int4": ("int4", "llama.cpp-q4_0")}.items():
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
