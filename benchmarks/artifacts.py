"""Exported-artifact workload: what TorchScript, torch.export and AOTInductor artifacts cost
and how fast they run, next to eager gptfn.

The artifacts are built by the export suite (``export.build``), each verified against eager
before it is used. Forward latency (batch 1, a 128-token prompt; 32 with --quick) is timed
in interleaved rounds; size, load time, first call and per-token decode latency come from
the export suite's verification report (one run each). On the run's device and dtype
(bf16 artifacts are verified against an fp32 reference, see ``export.verify``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch

from benchmarks.device import Target
from benchmarks.harness import environment, interleaved, quick_config


def bench_artifacts(quick: bool, rounds: int, preset: str = "gpt2",
                    target: Optional[Target] = None, log=print) -> dict:
    from export.build import build, check_request, load_torchscript
    from export.verify import verify
    from gptfn import GPTConfig, GPTModel

    target = target or Target.parse()

    if quick:
        cfg = quick_config(context_length=64, embed_dim=64)
        length, max_seq_len = 32, 64
    else:
        cfg = GPTConfig.from_preset(preset, dropout_rate=0.0)
        length, max_seq_len = 128, 256
    model = GPTModel(cfg, seed=0).eval().to(device=target.device, dtype=target.dtype)
    idx = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    idx = idx.to(target.device)
    reports = {}
    with tempfile.TemporaryDirectory(prefix="gptfn-artifacts-") as tmp, torch.no_grad():
        paths = {"torchscript": Path(tmp) / "gpt.pt", "pt2": Path(tmp) / "gpt.pt2",
                 "aoti": Path(tmp) / "gpt_aoti.pt2"}
        check_request(cfg, paths["pt2"], max_seq_len, target.device, target.dtype)
        for kind, path in paths.items():
            log(f"artifacts: building and verifying {kind} on {target.describe()}")
            reports[kind] = build(kind, model, path, max_seq_len,
                                  lambda k, p: verify(k, p, model, max_seq_len))
        runners = {
            "eager": model,
            "torchscript": load_torchscript(paths["torchscript"]),
            "pt2": torch.export.load(str(paths["pt2"])).module(),
            "aoti": torch._inductor.aoti_load_package(str(paths["aoti"])),
        }
        log(f"artifacts: forward latency, {rounds} interleaved rounds")
        samples = interleaved({k: (lambda r=r: r(idx)) for k, r in runners.items()},
                              rounds=rounds, warmup=2, clock=target.clock())
    rows = []
    for name in runners:
        rep = reports.get(name, {})
        rows.append({
            "variant": name,
            "forward_ms": samples.median(name) * 1e3,
            "ratio_vs_eager": samples.ratio(name, "eager"),
            "size_mb": rep.get("size_bytes", 0) / 1e6 if rep else None,
            "load_s": rep.get("load_s"),
            "per_token_ms": rep["per_token_s"] * 1e3 if rep else None,
            "eager_per_token_ms": rep["eager_per_token_s"] * 1e3 if rep else None,
        })
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["| variant | forward ms (median) | vs eager | size (MB) | load (s) | decode ms/token "
             "| eager ms/token (same run) |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['forward_ms']:.1f} | {r['ratio_vs_eager']:.2f}x | "
              f"{fmt(r['size_mb'], '.1f')} | {fmt(r['load_s'], '.2f')} | "
              f"{fmt(r['per_token_ms'], '.2f')} | {fmt(r['eager_per_token_ms'], '.2f')} |"
              for r in rows]
    return {"workload": "artifacts", "config": cfg.to_dict(), "device": str(target.device),
            "dtype": target.dtype_name, "prompt": length,
            "max_seq_len": max_seq_len, "rounds": rounds, "samples_s": samples.times,
            "reports": reports, "rows": rows, "environment": environment(),
            "table": "\n".join(lines)}
