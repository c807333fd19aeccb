"""Compile-time workload: cold and warm compile of the decode step and of the forward pass,
and how many graphs a second generation of the same shapes compiles (0: no recompiles).

Each measurement runs in a fresh process with its own inductor cache directory: the first
process finds it empty (cold: dynamo, AOTAutograd and inductor do all their work), the
second finds what the first left (warm: the FX-graph and AOTAutograd caches answer). The
processes run ``python -m benchmarks.probes compile``.
"""

from __future__ import annotations

import json
import os
import tempfile

from benchmarks.harness import markdown, model_config, result, workload
from benchmarks.probes import run_probe


@workload("compile")
def bench_compile(opts) -> dict:
    target = opts.target
    cfg = model_config(opts)
    prompt, new = (16, 32) if opts.quick else (128, 128)
    args = (json.dumps(cfg.to_dict()), prompt, new, target.device, target.torch_dtype_name)
    with tempfile.TemporaryDirectory(prefix="gptfn-inductor-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        print(f"compile: cold run (empty inductor cache) on {target.describe()}, {new}-token "
              "generation after warm-up")
        cold = run_probe("compile probe", "compile", *args, env=env)
        print("compile: warm run (the same cache, a new process)")
        warm = run_probe("compile probe", "compile", *args, env=env)
    rows = [
        {"what": "decode step (first generation minus the second)", "cold_s": cold["decode_s"],
         "warm_s": warm["decode_s"]},
        {"what": "forward (first call)", "cold_s": cold["forward_s"], "warm_s": warm["forward_s"]},
    ]
    table = markdown([("compiled", "{what}"), ("cold (s)", "{cold_s:.1f}"),
                      ("warm (s)", "{warm_s:.1f}")], rows)
    table += ["", f"graphs compiled during a second {new}-token generation: "
                  f"{cold['graphs_after_warmup']} (cold run), {warm['graphs_after_warmup']} "
                  "(warm run)"]
    return result("compile", table, target, cfg, cold=cold, warm=warm, rows=rows)
