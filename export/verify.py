"""Checking an artifact against eager gptfn, and reporting what it costs.

For each artifact: logits equal to eager at several lengths, and its decoding checked step
by step against ``gptfn.generate`` over at least 16 steps (TorchScript: its own
``generate``; the .pt2 forward: recomputing the sequence each step; the AOTInductor
package: its forward program fills the cache with the prompt, its decode program steps).
The report holds size, load time, first-call latency and per-token latency against eager.

- fp32: logits within 1e-5 of their largest magnitude (max abs difference; 1e-5 where
  they are all below 1) and greedy tokens identical. Relative, because a program that sums
  in another order differs by rounding at the logits' own scale: 16 layers of 1600 channels
  differ by more than 1e-5 in absolute terms.
- bf16/fp16: two correct programs round differently (inductor fuses and keeps fp32
  intermediates where eager rounds each op), so neither bit equality nor free-running
  greedy equality is the right test. Both eager and the artifact are held to an fp32
  reference with the same (upcast) weights: the artifact's max abs error may be at most
  twice eager's own, plus one unit in the last place at the logits' scale
  (``_half_allowed``). Decoding is checked teacher-forced on eager's greedy sequence:
  every step's logits are held to the same rule (AOTInductor: through its two programs,
  cache included; .pt2 and TorchScript: their forward over the sequence, which is how
  .pt2 decodes and which runs the same kernels as TorchScript's generate). Whether
  free-running greedy tokens equal eager's is reported, not required.
- weight formats (bf16 / fp16 / int8 weights, fp32 compute): the same rule, with the core's
  exact products as the reference and gptfn's kernel route (what the package runs on the
  CPU; int8's quantizes activations), run without inductor, as the eager beside which the
  artifact is held: it may stray from the exact product at most twice as far as gptfn's
  own kernels do (and by fp32's 1e-5 in any case).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import Tensor

from export.errors import VerificationError  # re-exported: export.verify's own name for it

TOLERANCE = 1e-5  # fp32, of the logits' largest magnitude
MIN_DECODE_STEPS = 16




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
        from export.aoti import load

        art, load_s = _timed(lambda: load(forward_path))
    report: Dict[str, object] = {
        "kind": kind,
        "size_bytes": sum(Path(p).stat().st_size for p in paths),
        "load_s": load_s,
        "max_seq_len": max_seq_len,
    }
    eager, reference = _held_to(model, config, params, max_seq_len)
    half = reference is not None
    diffs, errors, allowed = {}, {}, {}
    with torch.no_grad():
        for i, length in enumerate(_lengths(max_seq_len)):
            idx = torch.randint(0, config.vocab_size, (2, length), generator=gen).to(device)
            got, t = _timed(lambda: art(idx))
            if i == 0:
                report["first_call_s"] = t
            want = eager(idx)
            diffs[length] = (got - want).abs().max().item()
            allowed[length] = fp32_allowed(want)
            if half:
                errors[length] = _check_half(kind, f"logits at length {length}", got, want,
                                             reference(idx))
        report["max_abs_diff"] = diffs
        if half:
            report["error_vs_fp32"] = errors
        else:
            bad = {k: v for k, v in diffs.items() if not v <= allowed[k]}
            if bad:
                raise VerificationError(f"{kind} logits differ from eager by more than "
                                        f"{TOLERANCE} of their largest magnitude (at least "
                                        f"{TOLERANCE}): {bad}")

        p, n = _decode_plan(max_seq_len)
        prompt = torch.randint(0, config.vocab_size, (1, p), generator=gen).to(device)
        generate(model, prompt, 2)  # warm-up: first-call costs are not per-token costs
        want, eager_s = _timed(lambda: generate(model, prompt, n))
        if kind == "torchscript":
            got, art_s = _timed(lambda: art.generate(prompt, n, 0.0, 0, 0))
        elif kind == "pt2":
            got, art_s = _timed(lambda: _greedy_by_recompute(art, prompt, n))
        else:
            got, art_s = _timed(lambda: art.generate(prompt, n))
        same = got.shape == want.shape and torch.equal(got, want)
        if half:
            # teacher-forced: the artifact's decode path on eager's own sequence
            seq = want[:, :-1]
            if kind == "aoti":
                steps = _logits_through_cache(art, seq, p)
            else:  # pt2 decodes by recomputing; TorchScript runs eager's own kernels
                steps = art(seq)
            report["decode_error_vs_fp32"] = _check_half(
                kind, "teacher-forced decode logits", steps[:, p - 1:], eager(seq)[:, p - 1:],
                reference(seq)[:, p - 1:])
    if not half and not same:
        first = int((got != want).nonzero()[0, 1]) - p if got.shape == want.shape else -1
        raise VerificationError(f"{kind} greedy tokens differ from eager generation "
                                f"(first at new token {first})")
    report.update({"decode_steps": n, "tokens_equal": bool(same),
                   "per_token_s": art_s / n, "eager_per_token_s": eager_s / n})
    return report


def _held_to(model, config, params: Dict[str, Tensor], max_seq_len: int):
    """(eager, reference): the logits eager gptfn computes, and, where an artifact cannot
    match them bit for bit, the exact logits that both are held to (None in fp32)."""
    from gptfn.formats import scheme_of

    if scheme_of(params) is not None:
        # a weight format: the core's products (exact, in fp32) are the reference, and the
        # eager beside which the artifact is held is gptfn's own kernel route (what the
        # package runs on the CPU; int8's quantizes activations), run op by op
        from export.aoti import routed_forward

        return routed_forward(config, params, max_seq_len), model
    if params["wte.weight"].dtype != torch.float32:
        return model, _fp32_reference(config, params)
    return model, None


def _fp32_reference(config, params: Dict[str, Tensor]):
    """Logits of the same weights, upcast, in fp32: what a half-precision run approximates."""
    from gptfn.functional.model import gpt_forward

    ref = {k: v.float() for k, v in params.items()}
    return lambda idx: gpt_forward(ref, idx, config)


def fp32_allowed(want: Tensor) -> float:
    """How far fp32 logits may stray from eager's ``want``: ``TOLERANCE`` of their largest
    magnitude, and never less than ``TOLERANCE``."""
    return TOLERANCE * max(1.0, want.abs().max().item())


def _half_allowed(eager_error: float, reference: Tensor, dtype: torch.dtype) -> float:
    """Twice eager's error, plus one unit in the last place at the logits' largest
    magnitude (so that an eager run that happens to round well does not fail the artifact);
    in fp32 (a weight format's compute) never less than fp32's own ``TOLERANCE``, which a
    program that fuses differently is allowed anyway."""
    ulp = torch.finfo(dtype).eps * reference.abs().max().item()
    floor = TOLERANCE if dtype == torch.float32 else 0.0
    return max(2 * eager_error + ulp, floor)


def _check_half(kind: str, what: str, got: Tensor, eager: Tensor, reference: Tensor) -> dict:
    eager_error = (eager.float() - reference).abs().max().item()
    error = (got.float() - reference).abs().max().item()
    allowed = _half_allowed(eager_error, reference, got.dtype)
    if not error <= allowed:
        raise VerificationError(
            f"{kind} {what}: max abs error vs the fp32 reference {error:.3g} exceeds {allowed:.3g} "
            f"(twice eager's {eager_error:.3g} + 1 ulp)")
    return {"artifact": error, "eager": eager_error, "allowed": allowed}


def _greedy_by_recompute(forward, prompt: Tensor, n: int) -> Tensor:
    seq = prompt
    for _ in range(n):
        nxt = forward(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def _logits_through_cache(package, seq: Tensor, prompt: int) -> Tensor:
    """(1, T, V): an AOTInductor package's logits for ``seq``, the first ``prompt`` tokens
    through its forward program (filling the cache), then one decode step per token."""
    keys, values = package.new_cache(1)
    out = [package.forward_with_cache(seq[:, :prompt], keys, values)]  # (1, prompt, V)
    for t in range(prompt, seq.size(1)):
        pos = torch.tensor([t], device=seq.device)
        out.append(package.decode(seq[:, t:t + 1], keys, values, pos)[:, None])  # (1, 1, V)
    return torch.cat(out, dim=1)


def format_report(r: dict) -> str:
    eager = r["eager_per_token_s"] * 1e3
    tokens = (f"= eager over {r['decode_steps']} steps" if r["tokens_equal"] else
              f"teacher-forced logits within tolerance over {r['decode_steps']} steps; "
              "free-running greedy parts from eager")
    rows = [
        "| artifact | size (MB) | load (s) | first call (ms) | ms/token | eager ms/token | "
        "max abs diff | tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        f"| {r['kind']} | {r['size_bytes'] / 1e6:.1f} | {r['load_s']:.2f} | "
        f"{r['first_call_s'] * 1e3:.1f} | {r['per_token_s'] * 1e3:.2f} | {eager:.2f} | "
        f"{max(r['max_abs_diff'].values()):.1e} | {tokens} |",
    ]
    return "\n".join(rows)
