"""Peak-memory workload: the memory each variant needs, each in a process of its own.

Memory cannot be compared inside one process (the allocator keeps what earlier variants
freed), so each variant runs in a fresh process that builds only its own model and
reports, from /proc/self/status, its resident set after building the model and its
high-water mark after running (VmHWM belongs to the process image, so nothing from the
parent that started it is counted). On CUDA the probe reports torch's peak allocated
bytes instead. Linux only; elsewhere the workload says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks.harness import environment, quick_config

PROBE = r"""
import json, sys
import torch, torch.nn.functional as F
import transformers
from gptfn import GPTConfig, GPTModel
from gptfn.generation import generate
from gptfn.train import TrainSettings, make_optimizer

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

cfg = GPTConfig.from_dict(json.loads(sys.argv[1]))
variant, prompt, new, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
if variant.startswith("hf"):
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_hf_dict()))
else:
    model = GPTModel(cfg, seed=0)
idx = torch.randint(0, cfg.vocab_size, (batch, prompt))
built = status("VmRSS")
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
        if variant.startswith("hf"):
            loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        else:
            loss = model(x, y)
        loss.backward()
        opt.step()
print(json.dumps({"after_build_mb": built, "peak_mb": status("VmHWM")}))
"""

VARIANTS = ("hf_decode", "gptfn_decode", "gptfn_compiled_decode", "hf_train", "gptfn_train")


def bench_memory(quick: bool, preset: str = "gpt2", log=print) -> dict:
    from gptfn import GPTConfig

    if not os.path.exists("/proc/self/status"):
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
                            str(length), str(new), str(train_batch)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"memory probe {variant} failed: {r.stderr.strip()[-2000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append({"variant": variant, "batch": train_batch, **out,
                     "extra_mb": out["peak_mb"] - out["after_build_mb"]})
    lines = ["| variant | batch | RSS after building (MB) | peak RSS (MB) | peak - built (MB) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['batch']} | {r['after_build_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['extra_mb']:.0f} |" for r in rows]
    return {"workload": "memory", "config": cfg.to_dict(), "prompt": prompt,
            "new_tokens": new, "rows": rows, "environment": environment(),
            "table": "\n".join(lines)}
