"""Checking GGUF and ONNX files in the engines they are for, against eager gptfn in fp32.

Each file is loaded by its engine in a process of its own (``export.engines``), which must
compute what gptfn computes:

- **logits**: every position's logits of random sequences of several lengths (one pass), and
  the logits after each token fed one at a time through the engine's own KV cache, are held
  to eager's by relative error ``||engine - eager|| / ||eager||`` (over the whole array): at
  most ``TOLERANCE[precision]``. fp32 files are also held by max abs difference (ONNX:
  1e-4).
- **greedy decoding**: at least 16 new tokens after a random prompt, the engine's own loop
  (prompt in one pass, then one token per step through its cache) against
  ``gptfn.generate``. At full precision the tokens must be equal. Where they part at a step
  whose top two eager logits are closer than the error allowed (a tie that either choice
  honours), the check is passed and the report says so. At reduced precision (f16, q8_0,
  q4_0, int8) agreement is reported, not required: random weights give flat logits, so greedy
  paths part within a few tokens (judge those by their logits error, and by perplexity on a
  trained model).
- **tokenizer** (GGUF): llama.cpp's token ids for a text with spaces, digits, punctuation,
  newlines and non-ASCII equal ``BPETokenizer``'s (a vocabulary cut short of GPT-2's: a
  tiktoken encoding of the same ranks cut the same way), and its detokenized bytes equal the
  text's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from export.verify import VerificationError

# Relative error of logits against eager fp32 allowed per file precision: what the engine's
# arithmetic and the rounding of the weights cost, with room for models other than the ones
# measured (a file with a wrong or misplaced tensor gives 1 or more). llama.cpp's f32 computes
# GELU through a float16 table (4.8e-4 on GPT-2 124M); f16 rounds weights to 11-bit
# mantissas (9.2e-4); q8_0 to 8 bits per 32-value block (2.5e-2); q4_0 to 4 bits per
# 32-value block, a step 16 times q8_0's (0.28 on GPT-2 124M, 0.31 on GPT-2 medium, 9e-2 on
# the tests' tiny models: random weights; its bound is only twice that, not four times as
# q8_0's, to stay below the error of a wrong file); ONNX Runtime's dynamic int8 also
# quantizes activations, per tensor, at run time (5.5e-2 on GPT-2 124M, up to 0.16 on small
# random models).
TOLERANCE = {"f32": 2e-3, "fp32": 1e-5, "f16": 1e-2, "q8_0": 1e-1, "q4_0": 6e-1,
             "int8": 3.5e-1}
ONNX_MAX_ABS = 1e-4
MIN_DECODE_STEPS = 16
TOKENIZER_TEXT = ("Hello, world! GPT-2's tokenizer:   spaces,\ttabs\n\nnew lines; digits 1234567 "
                  "and 3.14159; naïve café, Grüße, 東京, 😀 — «quotes» <|endoftext|> (as text)")


def decode_plan(context_length: int):
    """(prompt length, new tokens): 16 new tokens or more, where the context allows."""
    prompt = max(1, min(8, context_length - MIN_DECODE_STEPS))
    return prompt, max(1, min(32, context_length - prompt))


def relative(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _eager_logits(model, ids: List[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()  # (T, V)


def check_logits(engine, model, precision: str, seed: int, max_abs: Optional[float]) -> dict:
    """Logits of one pass and of a stepwise pass through the engine's cache."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    tol = TOLERANCE[precision]
    lengths = sorted({1, min(7, config.context_length), config.context_length})
    out: Dict[str, Dict[str, float]] = {"one_pass": {}, "stepwise": {}}

    def held(what: str, got: np.ndarray, want: np.ndarray) -> Dict[str, float]:
        row = {"relative": relative(got, want), "max_abs": float(np.abs(got - want).max())}
        if not row["relative"] <= tol or (max_abs is not None and not row["max_abs"] <= max_abs):
            raise VerificationError(
                f"{precision} {what}: relative error {row['relative']:.2e} (allowed {tol:.2g})"
                + (f", max abs {row['max_abs']:.2e} (allowed {max_abs:.2g})" if max_abs else ""))
        return row

    for t in lengths:
        ids = torch.randint(0, config.vocab_size, (t,), generator=gen).tolist()
        out["one_pass"][str(t)] = held(f"logits at length {t}", engine.logits(ids),
                                       _eager_logits(model, ids))
    p, _ = decode_plan(config.context_length)
    # through the cache: the prompt, then up to 56 tokens one by one
    ids = torch.randint(0, config.vocab_size, (min(config.context_length, 64),),
                        generator=gen).tolist()
    out["stepwise"][str(len(ids))] = held(
        "logits fed one token at a time through the cache", engine.stepwise(ids, p),
        _eager_logits(model, ids)[p - 1:])
    return out


def check_greedy(engine, model, precision: str, seed: int, required: bool) -> dict:
    """The engine's greedy tokens against ``gptfn.generate``'s."""
    from gptfn.generation import generate

    config = model.config
    p, n = decode_plan(config.context_length)
    gen = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, config.vocab_size, (1, p), generator=gen)
    with torch.no_grad():
        generate(model, prompt, 2)  # warm-up: first-call costs are not per-token costs
        t0 = time.perf_counter()
        want = generate(model, prompt, n)[0, p:].tolist()
    eager_s = time.perf_counter() - t0
    got, stamps = engine.greedy(prompt[0].tolist(), n)
    same = first_difference(got, want)
    report = {"steps": n, "tokens_equal": got == want, "equal_prefix": same,
              "engine_per_token_s": (stamps[-1] - stamps[0]) / max(1, n - 1),
              "eager_per_token_s": eager_s / n}
    if got != want and required:
        seq = prompt[0].tolist() + want
        logits = _eager_logits(model, seq[:p + same])[-1]
        top2 = np.sort(logits)[-2:]
        gap = float(top2[1] - top2[0])
        # the error allowed per logit, twice over: either of two logits that close may win
        allowed = 2 * TOLERANCE[precision] * float(np.linalg.norm(logits)) / np.sqrt(logits.size)
        if not gap <= max(allowed, 1e-6):
            raise VerificationError(
                f"{precision} greedy tokens part from gptfn's at new token {same} "
                f"(engine {got[same]}, gptfn {want[same]}; eager's top-2 gap {gap:.2e})")
        report["parted_at_tie"] = {"step": same, "top2_gap": gap}
    return report


def first_difference(a: List[int], b: List[int]) -> int:
    """Where two id lists first differ (the shorter one's length where one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_tokenizer(engine, vocab_size: int) -> dict:
    """llama.cpp's tokenizer (from the file) against gptfn's on ``TOKENIZER_TEXT``."""
    from gptfn.tokenizer import BPETokenizer

    if vocab_size < 256:
        return {"checked": False, "why": f"a vocabulary of {vocab_size} ids holds not even "
                                          "the 256 byte tokens: no text tokenizes"}
    if vocab_size >= 50257:
        want = BPETokenizer("gpt2").encode_ordinary(TOKENIZER_TEXT)
    else:
        want = _cut_encoding(vocab_size).encode_ordinary(TOKENIZER_TEXT)
    got = engine.tokenize(TOKENIZER_TEXT)
    if got != want:
        first = first_difference(got, want)
        raise VerificationError(f"llama.cpp tokenizes the check text differently from gptfn, "
                                f"from token {first}: {got[first:first + 5]} against "
                                f"{want[first:first + 5]}")
    back = engine.detokenize(want)
    if back != TOKENIZER_TEXT.encode("utf-8"):
        raise VerificationError("llama.cpp's detokenized check text differs from the text")
    return {"checked": True, "tokens": len(want)}


def _cut_encoding(vocab_size: int):
    """A tiktoken encoding of GPT-2's ranks below ``vocab_size`` (what a model of a smaller
    vocabulary, trained on text tokenized that way, reads)."""
    import tiktoken

    from gptfn.tokenizer import get_encoding, load_ranks

    ranks = {t: r for t, r in load_ranks().items() if r < vocab_size}
    return tiktoken.Encoding(name=f"r50k_cut_{vocab_size}", pat_str=get_encoding("gpt2")._pat_str,
                             mergeable_ranks=ranks, special_tokens={})


def verify_gguf(path: Path, model, precision: str, seed: int = 0, threads: int = 2) -> dict:
    from export.engines import Engine

    config = model.config
    with Engine("llama.cpp", path, threads=threads, exact=True,
                n_ctx=config.context_length) as engine:
        if engine.info["n_vocab"] != config.vocab_size:
            raise VerificationError(f"llama.cpp reads {engine.info['n_vocab']} tokens, the "
                                    f"model has {config.vocab_size}")
        report = {"engine": f"llama.cpp (llama-cpp-python {engine.info['version']})",
                  "precision": precision,
                  "logits": check_logits(engine, model, precision, seed, None),
                  "greedy": check_greedy(engine, model, precision, seed,
                                         required=precision == "f32"),
                  "tokenizer": check_tokenizer(engine, config.vocab_size)}
    return report


def verify_onnx(path: Path, model, precision: str, seed: int = 0, threads: int = 2) -> dict:
    from export.engines import Engine

    with Engine("onnxruntime", path, threads=threads) as engine:
        exact = precision == "fp32"
        return {"engine": f"onnxruntime {engine.info['version']}", "precision": precision,
                "logits": check_logits(engine, model, precision, seed,
                                       ONNX_MAX_ABS if exact else None),
                "greedy": check_greedy(engine, model, precision, seed, required=exact)}


def format_interop_report(report: dict) -> str:
    """A Markdown table: one row per checked file."""
    checks = report.get("checks") or {report.get("artifacts", [{}])[0].get("file", "?"): report}
    rows = ["| file | engine | precision | logits rel. error (max) | greedy tokens | "
            "engine ms/token | eager ms/token | tokenizer |",
            "|---|---|---|---:|---|---:|---:|---|"]
    for name, r in checks.items():
        errors = [v["relative"] for part in r["logits"].values() for v in part.values()]
        g = r["greedy"]
        tokens = (f"= gptfn over {g['steps']}" if g["tokens_equal"] else
                  f"{g['equal_prefix']}/{g['steps']} before parting"
                  + (" (at a tie)" if "parted_at_tie" in g else ""))
        tok = r.get("tokenizer")
        tok_text = "-" if tok is None else ("= gptfn" if tok["checked"] else "not checked")
        rows.append(f"| {name} | {r['engine']} | {r['precision']} | {max(errors):.1e} | {tokens} "
                    f"| {g['engine_per_token_s'] * 1e3:.2f} | {g['eager_per_token_s'] * 1e3:.2f} "
                    f"| {tok_text} |")
    return "\n".join(rows)
