"""Checking an artifact against eager gptfn, and reporting what it costs.

For each artifact: logits equal to eager (fp32 max abs difference <= 1e-5) at several
lengths, and greedy decoding token-identical to ``gptfn.generate`` over at least 16 steps
(TorchScript: its own ``generate``; the .pt2 forward: recomputing the sequence each step;
the AOTInductor decode package: feeding the prompt through its cache, then decoding). The
report holds size, load time, first-call latency and per-token latency against eager.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import Tensor

TOLERANCE = 1e-5
MIN_DECODE_STEPS = 16


class VerificationError(RuntimeError):
    """An artifact that does not compute what eager gptfn computes."""


def _lengths(max_seq_len: int) -> List[int]:
    return sorted({1, min(7, max_seq_len), max(1, max_seq_len // 2), max_seq_len})


def _decode_plan(max_seq_len: int):
    if max_seq_len < MIN_DECODE_STEPS + 1:
        raise ValueError(f"max_seq_len must be at least {MIN_DECODE_STEPS + 1} to verify "
                         f"{MIN_DECODE_STEPS} decode steps, got {max_seq_len}")
    prompt = min(8, max_seq_len - MIN_DECODE_STEPS)
    return prompt, max_seq_len - prompt if max_seq_len - prompt < 32 else 32


def _timed(fn: Callable[[], object]):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def verify(kind: str, paths: List[Path], model, max_seq_len: int, seed: int = 0) -> dict:
    """Check the artifact(s) at ``paths``; returns the report, raises VerificationError."""
    from export.build import load_torchscript
    from gptfn.generation import generate, model_parts

    config, params = model_parts(model)
    device = params["wte.weight"].device
    gen = torch.Generator().manual_seed(seed)
    forward_path = paths[0]
    if kind == "torchscript":
        art, load_s = _timed(lambda: load_torchscript(forward_path))
    elif kind == "pt2":
        art, load_s = _timed(lambda: torch.export.load(str(forward_path)).module())
    else:
        art, load_s = _timed(lambda: torch._inductor.aoti_load_package(str(forward_path)))
    report: Dict[str, object] = {
        "kind": kind,
        "size_bytes": sum(Path(p).stat().st_size for p in paths),
        "load_s": load_s,
        "max_seq_len": max_seq_len,
    }
    diffs = {}
    with torch.no_grad():
        for i, length in enumerate(_lengths(max_seq_len)):
            idx = torch.randint(0, config.vocab_size, (2, length), generator=gen).to(device)
            got, t = _timed(lambda: art(idx))
            if i == 0:
                report["first_call_s"] = t
            want = model(idx)
            diffs[length] = (got - want).abs().max().item()
        report["max_abs_diff"] = diffs
        bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE}
        if bad:
            raise VerificationError(f"{kind} logits differ from eager by more than {TOLERANCE}: {bad}")

        p, n = _decode_plan(max_seq_len)
        prompt = torch.randint(0, config.vocab_size, (1, p), generator=gen).to(device)
        generate(model, prompt, 2)  # warm-up: first-call costs are not per-token costs
        want, eager_s = _timed(lambda: generate(model, prompt, n))
        if kind == "torchscript":
            got, art_s = _timed(lambda: art.generate(prompt, n, 0.0, 0, 0))
        elif kind == "pt2":
            got, art_s = _timed(lambda: _greedy_by_recompute(art, prompt, n))
        else:
            step = torch._inductor.aoti_load_package(str(paths[1]))
            got, art_s = _timed(lambda: _greedy_with_decode_step(step, config, prompt, n,
                                                                 max_seq_len, device))
    if not torch.equal(got, want):
        first = int((got != want).nonzero()[0, 1]) - p if got.shape == want.shape else -1
        raise VerificationError(f"{kind} greedy tokens differ from eager generation "
                                f"(first at new token {first})")
    report.update({"decode_steps": n, "tokens_equal": True,
                   "per_token_s": art_s / n, "eager_per_token_s": eager_s / n})
    return report


def _greedy_by_recompute(forward, prompt: Tensor, n: int) -> Tensor:
    seq = prompt
    for _ in range(n):
        nxt = forward(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def _greedy_with_decode_step(step, config, prompt: Tensor, n: int, max_seq_len: int, device):
    shape = (config.num_layers, 1, config.num_heads, max_seq_len, config.head_dim)
    keys = torch.zeros(shape, device=device)
    values = torch.zeros(shape, device=device)
    out = [prompt]
    logits = None
    for t in range(prompt.size(1)):  # the prompt, through the cache one token at a time
        logits, keys, values = step(prompt[:, t:t + 1], keys, values,
                                    torch.tensor([t], device=device))
    pos = prompt.size(1)
    for i in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        if i + 1 < n:
            logits, keys, values = step(nxt, keys, values, torch.tensor([pos + i], device=device))
    return torch.cat(out, dim=1)


def format_report(r: dict) -> str:
    eager = r["eager_per_token_s"] * 1e3
    rows = [
        "| artifact | size (MB) | load (s) | first call (ms) | ms/token | eager ms/token | "
        "max abs diff | tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        f"| {r['kind']} | {r['size_bytes'] / 1e6:.1f} | {r['load_s']:.2f} | "
        f"{r['first_call_s'] * 1e3:.1f} | {r['per_token_s'] * 1e3:.2f} | {eager:.2f} | "
        f"{max(r['max_abs_diff'].values()):.1e} | = eager over {r['decode_steps']} steps |",
    ]
    return "\n".join(rows)
