"""Tokenizer workloads.

- ``tokenize``: ``BPETokenizer.encode_batch`` against raw tiktoken's ``Encoding.encode_batch``
  (built by tiktoken's own loader from the same rank file), same texts, same threads,
  interleaved rounds. Target: gptfn >= 0.9x tiktoken's throughput.
- ``prepare``: ``gptfn prepare`` in a child process on a generated corpus; its peak RSS
  (ru_maxrss of the child) and throughput. Target: peak RSS < 300 MB on 200 MB of text.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.corpus import stdlib_texts, write_corpus
from benchmarks.harness import environment, interleaved

ENDOFTEXT = {"<|endoftext|>"}


def raw_tiktoken_encoding():
    """The peer: tiktoken's loader and Encoding, nothing of gptfn's but the rank file path."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    from gptfn.tokenizer import R50K_PATH, R50K_SHA256

    ranks = load_tiktoken_bpe(str(R50K_PATH), expected_hash=R50K_SHA256)
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def bench_tokenize(quick: bool, rounds: int, log=print) -> dict:
    from gptfn import BPETokenizer

    target = (1 << 20) if quick else 10 * (1 << 20)
    texts = stdlib_texts(target)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    threads = 8
    ours = BPETokenizer("gpt2")
    peer = raw_tiktoken_encoding()
    if ours.encode_batch(texts, num_threads=threads) != peer.encode_batch(
        texts, num_threads=threads, allowed_special=ENDOFTEXT
    ):
        raise RuntimeError("gptfn and tiktoken disagree on the benchmark text")
    log(f"tokenize: {nbytes / 1e6:.1f} MB in {len(texts)} texts, {rounds} interleaved rounds")
    samples = interleaved(
        {
            "tiktoken": lambda: peer.encode_batch(texts, num_threads=threads, allowed_special=ENDOFTEXT),
            "gptfn": lambda: ours.encode_batch(texts, num_threads=threads),
        },
        rounds=rounds,
        progress=lambda m: log(f"  {m}"),
    )
    rows = []
    for name in ("tiktoken", "gptfn"):
        t = samples.times[name]
        rows.append({
            "variant": name,
            "median_s": samples.median(name),
            "min_s": min(t),
            "max_s": max(t),
            "mb_per_s": nbytes / 1e6 / samples.median(name),
            "ratio_vs_tiktoken": samples.ratio(name, "tiktoken"),
        })
    table = "\n".join(
        ["| variant | MB/s (median) | median s | min-max s | vs tiktoken |",
         "|---|---:|---:|---:|---:|"]
        + [f"| {r['variant']} | {r['mb_per_s']:.2f} | {r['median_s']:.3f} | "
           f"{r['min_s']:.3f}-{r['max_s']:.3f} | {r['ratio_vs_tiktoken']:.3f}x |" for r in rows]
    )
    return {
        "workload": "tokenize",
        "bytes": nbytes,
        "texts": len(texts),
        "num_threads": threads,
        "rounds": rounds,
        "samples_s": samples.times,
        "rows": rows,
        "environment": environment(),
        "table": table,
    }


def bench_prepare(quick: bool, log=print) -> dict:
    target = (20 << 20) if quick else (200 << 20)
    with tempfile.TemporaryDirectory(prefix="gptfn-bench-") as tmp:
        corpus, out = Path(tmp) / "corpus", Path(tmp) / "out"
        nbytes = write_corpus(corpus, target)
        log(f"prepare: {nbytes / 1e6:.0f} MB corpus, peak RSS of `gptfn prepare` in a child")
        # A child's ru_maxrss counts the memory of the process it was forked from, so the
        # run goes through a small launcher whose own footprint is far below the figure.
        launcher = ("import resource, subprocess, sys; "
                    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                    "sys.stderr.write(r.stderr); print(r.stdout.strip()); "
                    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
                    "sys.exit(r.returncode)")
        cmd = [sys.executable, "-c", launcher, sys.executable, "-m", "gptfn", "prepare",
               str(corpus), "--out", str(out), "--no-progress"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"gptfn prepare failed: {proc.stderr.strip()}")
        *lines, peak_kib = proc.stdout.strip().splitlines()
        stdout = "\n".join(lines)
        from gptfn.prepare import read_meta

        tokens = read_meta(out)["token_count"]
    peak_mb = int(peak_kib) / 1024  # Linux reports KiB
    table = "\n".join([
        "| corpus MB | tokens | seconds | MB/s | peak RSS MB |",
        "|---:|---:|---:|---:|---:|",
        f"| {nbytes / 1e6:.0f} | {tokens:,} | {seconds:.1f} | {nbytes / 1e6 / seconds:.2f} | "
        f"{peak_mb:.0f} |",
    ])
    return {
        "workload": "prepare",
        "bytes": nbytes,
        "tokens": tokens,
        "seconds": seconds,
        "peak_rss_mb": peak_mb,
        "stdout": stdout,
        "environment": environment(),
        "table": table,
    }
