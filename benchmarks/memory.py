"""Peak-memory workload: the memory each variant needs, each in a process of its own.

Memory cannot be compared inside one process (the allocator keeps what earlier variants
freed), so each variant runs in a fresh process that builds only its own model (and
imports transformers only for HF's) and reports, from /proc/self/status, its resident set after building the model and its
high-water mark after running (VmHWM belongs to the process image, so nothing from the
parent that started it is counted). On CUDA (``--device cuda``) the probe reports torch's
allocated bytes after building and their peak instead (``torch.cuda.max_memory_allocated``).
Linux only; elsewhere the workload says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional

from benchmarks.device import Target
from benchmarks.harness import environment, quick_config

PROBE = r"""
import json, sys
import torch, torch.nn.functional as F
from gptfn import GPTConfig, GPTModel
from gptfn.generation import generate
from gptfn.train import TrainSettings, make_optimizer

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

def cuda_mb(peak):
    torch.cuda.synchronize(device)
    got = torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
    return got / 2**20

cfg = GPTConfig.from_dict(json.loads(sys.argv[1]))
variant, prompt, new, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
device, dtype = torch.device(sys.argv[6]), getattr(torch, sys.argv[7])
cuda = device.type == "cuda"
torch.manual_seed(0)
if variant.startswith("hf"):
    import transformers  # only here: its import alone takes seconds
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_hf_dict()))
else:
    model = GPTModel(cfg, seed=0)
if variant.endswith("decode"):  # inference in the run's dtype; training keeps fp32 weights
    model = model.to(dtype)
model = model.to(device)
idx = torch.randint(0, cfg.vocab_size, (batch, prompt)).to(device)
built = cuda_mb(False) if cuda else status("VmRSS")
if variant.endswith("decode"):
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            if variant.startswith("hf"):
                model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0)
            else:
                generate(model, idx, new, compile=variant == "gptfn_compiled_decode")
else:
    model.train()
    opt = make_optimizer(model, TrainSettings(lr=3e-4))
    x, y = idx[:, :-1], idx[:, 1:]
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if variant.startswith("hf"):
                loss = F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())
            else:
                loss = model(x, y)
        loss.backward()
        opt.step()
peak = cuda_mb(True) if cuda else status("VmHWM")
print(json.dumps({"after_build_mb": built, "peak_mb": peak}))
"""

VARIANTS = ("hf_decode", "gptfn_decode", "gptfn_compiled_decode", "hf_train", "gptfn_train")


def bench_memory(quick: bool, preset: str = "gpt2", target: Optional[Target] = None,
                 log=print) -> dict:
    from gptfn import GPTConfig

    target = target or Target.parse()
    if not target.is_cuda and not os.path.exists("/proc/self/status"):
        raise RuntimeError("the memory workload needs Linux's /proc/self/status")
    if quick:
        cfg = quick_config(context_length=128, embed_dim=64)
        prompt, new, batch = 32, 16, 2
    else:
        cfg = GPTConfig.from_preset(preset, dropout_rate=0.0)
        prompt, new, batch = 128, 64, 1
    rows = []
    for variant in VARIANTS:
        train_batch = 8 if variant.endswith("train") and not quick else batch
        length = prompt + (1 if variant.endswith("train") else 0)
        log(f"memory: {variant} in a fresh process")
        r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cfg.to_dict()), variant,
                            str(length), str(new), str(train_batch), str(target.device),
                            target.torch_dtype_name],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"memory probe {variant} failed: {r.stderr.strip()[-2000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append({"variant": variant, "batch": train_batch, **out,
                     "extra_mb": out["peak_mb"] - out["after_build_mb"]})
    what = "CUDA allocated" if target.is_cuda else "RSS"
    lines = [f"| variant | batch | {what} after building (MB) | peak {what} (MB) "
             "| peak - built (MB) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['batch']} | {r['after_build_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['extra_mb']:.0f} |" for r in rows]
    lines += ["", f"{target.describe()}; decode in {target.dtype_name}, training with fp32 "
                  "weights" + (f" under {target.dtype_name} autocast" if target.dtype_name != "fp32"
                               else "")]
    return {"workload": "memory", "config": cfg.to_dict(), "device": str(target.device),
            "dtype": target.dtype_name, "measure": what, "prompt": prompt,
            "new_tokens": new, "rows": rows, "environment": environment(),
            "table": "\n".join(lines)}
