"""Compile-time workload: cold and warm compile of the decode step and of the forward pass,
and how many graphs a second generation of the same shapes compiles (0: no recompiles).

Each measurement runs in a fresh process with its own inductor cache directory: the first
process finds it empty (cold: dynamo, AOTAutograd and inductor do all their work), the
second finds what the first left (warm: the FX-graph and AOTAutograd caches answer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Optional

from benchmarks.device import Target
from benchmarks.harness import environment, quick_config

PROBE = r"""
import json, sys, time
import torch
from torch._dynamo.utils import counters
from gptfn import GPTConfig, GPTModel
from gptfn.generation import generate_tokens

cfg = GPTConfig.from_dict(json.loads(sys.argv[1]))
prompt, new = int(sys.argv[2]), int(sys.argv[3])
device, dtype = torch.device(sys.argv[4]), getattr(torch, sys.argv[5])
model = GPTModel(cfg, seed=0).eval().to(device=device, dtype=dtype)
idx = torch.randint(0, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
idx = idx.to(device)
with torch.no_grad():
    t0 = time.perf_counter()
    for _ in generate_tokens(model, idx, new, compile=True):  # compiles the decode step
        pass
    first_s = time.perf_counter() - t0
    counters.clear()
    t0 = time.perf_counter()
    for _ in generate_tokens(model, idx, new, compile=True):  # the same shapes again
        pass
    second_s = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"]
    compiled = torch.compile(model, fullgraph=True)
    t0 = time.perf_counter()
    compiled(idx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    forward_s = time.perf_counter() - t0
print(json.dumps({"decode_s": first_s - second_s, "forward_s": forward_s,
                  "graphs_after_warmup": graphs}))
"""


def _probe(cfg_dict: dict, prompt: int, new: int, cache_dir: str, target: Target) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cfg_dict), str(prompt), str(new),
                        str(target.device), target.torch_dtype_name],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"compile probe failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_compile(quick: bool, preset: str = "gpt2", target: Optional[Target] = None,
                  log=print) -> dict:
    from gptfn import GPTConfig

    target = target or Target.parse()
    if quick:
        cfg = quick_config()
        prompt, new = 16, 32
    else:
        cfg = GPTConfig.from_preset(preset, dropout_rate=0.0)
        prompt, new = 128, 128
    with tempfile.TemporaryDirectory(prefix="gptfn-inductor-") as cache:
        log(f"compile: cold run (empty inductor cache) on {target.describe()}, {new}-token "
            "generation after warm-up")
        cold = _probe(cfg.to_dict(), prompt, new, cache, target)
        log("compile: warm run (the same cache, a new process)")
        warm = _probe(cfg.to_dict(), prompt, new, cache, target)
    rows = [
        {"what": "decode step (first generation minus the second)", "cold_s": cold["decode_s"],
         "warm_s": warm["decode_s"]},
        {"what": "forward (first call)", "cold_s": cold["forward_s"], "warm_s": warm["forward_s"]},
    ]
    lines = ["| compiled | cold (s) | warm (s) |", "|---|---:|---:|"]
    lines += [f"| {r['what']} | {r['cold_s']:.1f} | {r['warm_s']:.1f} |" for r in rows]
    lines += ["", f"graphs compiled during a second {new}-token generation: "
                  f"{cold['graphs_after_warmup']} (cold run), {warm['graphs_after_warmup']} (warm run)"]
    return {"workload": "compile", "config": cfg.to_dict(), "device": str(target.device),
            "dtype": target.dtype_name, "cold": cold, "warm": warm,
            "rows": rows, "environment": environment(), "table": "\n".join(lines)}
