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
from benchmarks.harness import interleaved, markdown, result, workload

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


@workload("tokenize")
def bench_tokenize(opts) -> dict:
    from gptfn import BPETokenizer

    texts = stdlib_texts((1 << 20) if opts.quick else 10 * (1 << 20))
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    threads = 8
    ours = BPETokenizer("gpt2")
    peer = raw_tiktoken_encoding()
    if ours.encode_batch(texts, num_threads=threads) != peer.encode_batch(
        texts, num_threads=threads, allowed_special=ENDOFTEXT
    ):
        raise RuntimeError("gptfn and tiktoken disagree on the benchmark text")
    print(f"tokenize: {nbytes / 1e6:.1f} MB in {len(texts)} texts, {opts.rounds} interleaved "
          "rounds")
    samples = interleaved(
        {"tiktoken": lambda: peer.encode_batch(texts, num_threads=threads,
                                               allowed_special=ENDOFTEXT),
         "gptfn": lambda: ours.encode_batch(texts, num_threads=threads)},
        rounds=opts.rounds, progress=lambda m: print(f"  {m}"))
    rows = [{"variant": name, "median_s": samples.median(name), "min_s": min(samples.times[name]),
             "max_s": max(samples.times[name]), "mb_per_s": nbytes / 1e6 / samples.median(name),
             "ratio_vs_tiktoken": samples.ratio(name, "tiktoken")}
            for name in ("tiktoken", "gptfn")]
    table = markdown([("variant", "{variant}"), ("MB/s (median)", "{mb_per_s:.2f}"),
                      ("median s", "{median_s:.3f}"), ("min-max s", "{min_s:.3f}-{max_s:.3f}"),
                      ("vs tiktoken", "{ratio_vs_tiktoken:.3f}x")], rows)
    return result("tokenize", table, bytes=nbytes, texts=len(texts), num_threads=threads,
                  rounds=opts.rounds, samples_s=samples.times, rows=rows)


@workload("prepare")
def bench_prepare(opts) -> dict:
    with tempfile.TemporaryDirectory(prefix="gptfn-bench-") as tmp:
        corpus, out = Path(tmp) / "corpus", Path(tmp) / "out"
        nbytes = write_corpus(corpus, (20 << 20) if opts.quick else (200 << 20))
        print(f"prepare: {nbytes / 1e6:.0f} MB corpus, peak RSS of `gptfn prepare` in a child")
        # through a launcher that reports its child's peak RSS (benchmarks.probes: rss)
        cmd = [sys.executable, "-m", "benchmarks.probes", "rss", sys.executable, "-m", "gptfn",
               "prepare", str(corpus), "--out", str(out), "--no-progress"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"gptfn prepare failed: {proc.stderr.strip()}")
        *lines, peak_kib = proc.stdout.strip().splitlines()
        from gptfn.prepare import read_meta

        tokens = read_meta(out)["token_count"]
    peak_mb = int(peak_kib) / 1024  # Linux reports KiB
    table = markdown([("corpus MB", "{mb:.0f}"), ("tokens", "{tokens:,}"),
                      ("seconds", "{seconds:.1f}"), ("MB/s", "{rate:.2f}"),
                      ("peak RSS MB", "{peak_mb:.0f}")],
                     [{"mb": nbytes / 1e6, "tokens": tokens, "seconds": seconds,
                       "rate": nbytes / 1e6 / seconds, "peak_mb": peak_mb}])
    return result("prepare", table, bytes=nbytes, tokens=tokens, seconds=seconds,
                  peak_rss_mb=peak_mb, stdout="\n".join(lines))
