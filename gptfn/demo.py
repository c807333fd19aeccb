"""The main job: one model end to end — build, count, forward, script, compile, generate.

``gptfn demo`` (``make run``) runs it on the 124M preset with seeded random weights (real
GPT-2 weights load the same way from a checkpoint path). Every variant's logits are
checked against eager before its timing is reported, and compiled generation must give
the eager tokens. These are one run's figures; the benchmark suite measures properly.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from gptfn.modules import GPTModel
from gptfn.scripting import script


@dataclass
class Stage:
    name: str
    setup_s: float  # building / scripting / compiling (first call included for compile)
    forward_ms: List[float] = field(default_factory=list)
    max_abs_diff: Optional[float] = None  # logits against eager

    @property
    def median_ms(self) -> float:
        return statistics.median(self.forward_ms)


@dataclass
class GenStage:
    name: str
    setup_s: float  # the first (untimed) run: warm-up, or compiling the decode step
    prefill_ms: float
    tokens_per_s: float  # decode steps only, batch x steps / time
    same_tokens: bool = True  # as eager greedy


def time_generation(net: GPTModel, idx: torch.Tensor, new_tokens: int, compile: bool):
    """(tokens (B, new), prefill seconds, decode tokens/s) of one greedy run."""
    from gptfn.generation import generate_tokens

    stamps, tokens = [time.perf_counter()], []
    for tok in generate_tokens(net, idx, new_tokens, compile=compile):
        tokens.append(tok)
        stamps.append(time.perf_counter())
    steps = len(tokens) - 1  # the first token comes from prefill
    rate = idx.size(0) * steps / (stamps[-1] - stamps[1]) if steps else float("nan")
    return torch.stack(tokens, 1), stamps[1] - stamps[0], rate


def _timed(fn: Callable[[], torch.Tensor], repeats: int) -> List[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def load_or_build(model: str, seed: int) -> tuple[GPTModel, str]:
    """A checkpoint path, or a preset name with seeded random weights."""
    from gptfn.cli_args import load_model

    from_path = Path(model).exists()
    net = load_model(model, random_init=not from_path, seed=seed)
    return net, f"weights from {model}" if from_path else f"random weights, seed {seed}"


def run_demo(
    model: str = "gpt2",
    batch_size: int = 1,
    seq_len: int = 128,
    repeats: int = 5,
    do_script: bool = True,
    do_compile: bool = True,
    seed: int = 0,
    new_tokens: int = 64,
    log: Callable[[str], None] = print,
) -> Tuple[List[Stage], List[GenStage]]:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if repeats <= 0:
        raise ValueError(f"repeats must be positive, got {repeats}")
    if new_tokens < 0:
        raise ValueError(f"new_tokens must be >= 0, got {new_tokens}")
    t0 = time.perf_counter()
    net, origin = load_or_build(model, seed)
    cfg = net.config
    if not 0 < seq_len <= cfg.context_length:
        raise ValueError(f"seq_len must be in [1, {cfg.context_length}], got {seq_len}")
    if seq_len + new_tokens > cfg.context_length:
        raise ValueError(
            f"seq_len {seq_len} + new_tokens {new_tokens} exceeds context_length "
            f"{cfg.context_length}"
        )
    build = Stage("eager", time.perf_counter() - t0)
    log(f"model      {model} ({origin})")
    log(
        f"config     vocab {cfg.vocab_size}, context {cfg.context_length}, width "
        f"{cfg.embed_dim}, {cfg.num_layers} layers, {cfg.num_heads} heads"
    )
    log(
        f"parameters {net.num_params():,} (tied head; "
        f"{net.num_params(include_embeddings=False):,} without embeddings)"
    )
    log(f"torch      {torch.__version__}, {torch.get_num_threads()} threads, fp32 on CPU")
    log(f"input      batch {batch_size} x {seq_len} tokens (ids drawn with seed {seed})")

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen)
    stages = [build]
    with torch.inference_mode():
        ref = net(idx)  # also the warm-up call
        build.forward_ms = _timed(lambda: net(idx), repeats)
        log(f"eager      built in {build.setup_s:.2f} s, forward {build.median_ms:.1f} ms")
        variants = []
        if do_script:
            variants.append(("torchscript", lambda: script(net)))
        if do_compile:
            variants.append(("compiled", lambda: _compile_and_warm(net, idx)))
        for name, make in variants:
            if name == "compiled":
                log("compiling  torch.compile(fullgraph=True); the first call compiles (tens of s)")
            t0 = time.perf_counter()
            fn = make()
            out = fn(idx)
            stage = Stage(name, time.perf_counter() - t0)
            stage.max_abs_diff = (out - ref).abs().max().item()
            fn(idx)  # warm-up: TorchScript's profiling executor optimises on later calls
            stage.forward_ms = _timed(lambda: fn(idx), repeats)
            stages.append(stage)
            log(
                f"{name:<10} ready in {stage.setup_s:.2f} s, forward {stage.median_ms:.1f} ms, "
                f"max |logits - eager| {stage.max_abs_diff:.2e}"
            )
    gen_stages = _generation(net, idx, new_tokens, do_compile, log) if new_tokens else []
    return stages, gen_stages


def _generation(net: GPTModel, idx: torch.Tensor, new_tokens: int, do_compile: bool, log):
    log(f"generate   greedy, {new_tokens} new tokens per row, KV cache")
    stages = []
    ref = None
    for name, compile in [("eager", False)] + ([("compiled", True)] if do_compile else []):
        if compile:
            log("compiling  the decode step (fullgraph=True); the first run compiles it")
        t0 = time.perf_counter()
        first, _, _ = time_generation(net, idx, new_tokens, compile)  # warm-up / compile
        setup = time.perf_counter() - t0
        tokens, prefill_s, rate = time_generation(net, idx, new_tokens, compile)
        ref = tokens if ref is None else ref
        same = torch.equal(tokens, ref) and torch.equal(first, ref)
        stages.append(GenStage(name, setup, prefill_s * 1e3, rate, same))
        log(f"{name:<11}decode {rate:.1f} tokens/s, prefill {prefill_s * 1e3:.0f} ms"
            f"{'' if same else ', TOKENS DIFFER FROM EAGER'}")
    return stages


def _compile_and_warm(net: GPTModel, idx: torch.Tensor):
    compiled = torch.compile(net, fullgraph=True)
    compiled(idx)  # compile now, so the setup time holds all of it
    return compiled


def format_generation(stages: List[GenStage]) -> str:
    eager = stages[0].tokens_per_s
    rows = [
        "| generation | first run (s) | prefill (ms) | decode tokens/s | vs eager | tokens |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for s in stages:
        rows.append(
            f"| {s.name} | {s.setup_s:.2f} | {s.prefill_ms:.0f} | {s.tokens_per_s:.1f} | "
            f"{s.tokens_per_s / eager:.2f}x | {'= eager' if s.same_tokens else 'DIFFER'} |"
        )
    return "\n".join(rows)


def format_table(stages: List[Stage], tokens: int) -> str:
    eager = stages[0].median_ms
    rows = [
        "| variant | setup (s) | forward median (ms) | min-max (ms) | tokens/s | vs eager "
        "| max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stages:
        diff = "-" if s.max_abs_diff is None else f"{s.max_abs_diff:.1e}"
        rows.append(
            f"| {s.name} | {s.setup_s:.2f} | {s.median_ms:.1f} | {min(s.forward_ms):.1f}-"
            f"{max(s.forward_ms):.1f} | {tokens / s.median_ms * 1e3:,.0f} | "
            f"{eager / s.median_ms:.2f}x | {diff} |"
        )
    return "\n".join(rows)
