"""Peak-memory workload: the memory each variant needs, each in a process of its own.

Memory cannot be compared inside one process (the allocator keeps what earlier variants
freed), so each variant runs in a fresh process (``python -m benchmarks.probes memory``) that
builds only its own model (and imports transformers only for HF's) and reports, from
/proc/self/status, its resident set after building the model and its high-water mark after
running (VmHWM belongs to the process image, so nothing from the parent that started it is
counted). On CUDA (``--device cuda``) the probe reports torch's allocated bytes after
building and their peak instead (``torch.cuda.max_memory_allocated``).
Linux only; elsewhere the workload says so.
"""

from __future__ import annotations

import json
import os

from benchmarks.harness import markdown, model_config, result, workload
from benchmarks.probes import run_probe

VARIANTS = ("hf_decode", "gptfn_decode", "gptfn_compiled_decode", "hf_train", "gptfn_train")


@workload("memory")
def bench_memory(opts) -> dict:
    target = opts.target
    if not target.is_cuda and not os.path.exists("/proc/self/status"):
        raise RuntimeError("the memory workload needs Linux's /proc/self/status")
    cfg = model_config(opts, context_length=128, embed_dim=64)
    prompt, new, batch = (32, 16, 2) if opts.quick else (128, 64, 1)
    rows = []
    for variant in VARIANTS:
        train = variant.endswith("train")
        rows_of = 8 if train and not opts.quick else batch
        print(f"memory: {variant} in a fresh process")
        out = run_probe(f"memory probe {variant}", "memory", json.dumps(cfg.to_dict()), variant,
                        prompt + (1 if train else 0), new, rows_of, target.device,
                        target.torch_dtype_name)
        rows.append({"variant": variant, "batch": rows_of, **out,
                     "extra_mb": out["peak_mb"] - out["after_build_mb"]})
    what = "CUDA allocated" if target.is_cuda else "RSS"
    table = markdown([("variant", "{variant}"), ("batch", "{batch}"),
                      (f"{what} after building (MB)", "{after_build_mb:.0f}"),
                      (f"peak {what} (MB)", "{peak_mb:.0f}"),
                      ("peak - built (MB)", "{extra_mb:.0f}")], rows)
    table += ["", f"{target.describe()}; decode in {target.dtype_name}, training with fp32 "
                  "weights" + (f" under {target.dtype_name} autocast"
                               if target.dtype_name != "fp32" else "")]
    return result("memory", table, target, cfg, measure=what, prompt=prompt, new_tokens=new,
                  rows=rows)
