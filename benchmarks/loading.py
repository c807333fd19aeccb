"""Weight-loading workload: from a checkpoint on disk to a model ready to run.

Variants, interleaved in rounds, on the same ``save_pretrained`` directory (warm page
cache, so this measures the loaders, not the disk): ``gptfn`` =
``GPTModel.from_pretrained`` (safetensors memory-mapped, tensors used in place), and
``hf`` = HF transformers' ``GPT2LMHeadModel.from_pretrained``. Each timed call ends with
one forward pass of one token, so lazily mapped weights are counted when first touched.
Both load to the run's device and dtype (``--device``, ``--dtype``); on CUDA the timed call
ends when the device has finished the token (CUDA events).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch

from benchmarks.device import Target
from benchmarks.harness import environment, interleaved, quick_config


def bench_loading(quick: bool, rounds: int, preset: str = "gpt2",
                  target: Optional[Target] = None, log=print) -> dict:
    import transformers

    from gptfn import GPTConfig, GPTModel

    target = target or Target.parse()
    cfg = (quick_config(context_length=128) if quick
           else GPTConfig.from_preset(preset, dropout_rate=0.0))
    idx = torch.zeros(1, 1, dtype=torch.long, device=target.device)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="gptfn-load-") as tmp:
        path = Path(tmp)
        GPTModel(cfg, seed=0).save_pretrained(path)
        size = (path / "model.safetensors").stat().st_size

        def ours():
            with torch.no_grad():
                GPTModel.from_pretrained(path, dtype=target.dtype, device=target.device)(idx)

        def theirs():
            with torch.no_grad():
                hf = transformers.GPT2LMHeadModel.from_pretrained(path, dtype=target.dtype)
                hf.to(target.device)(idx)

        log(f"loading: {size / 1e6:.0f} MB checkpoint to {target.describe()}, "
            f"{rounds} interleaved rounds")
        samples = interleaved({"hf": theirs, "gptfn": ours}, rounds=rounds, warmup=1,
                              clock=target.clock())
    rows = [{"variant": n, "median_s": samples.median(n), "min_s": min(samples.times[n]),
             "max_s": max(samples.times[n]), "ratio_vs_hf": samples.ratio(n, "hf")}
            for n in ("hf", "gptfn")]
    lines = ["| variant | load + first token (s, median) | min-max | vs HF |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | "
              f"{r['ratio_vs_hf']:.2f}x |" for r in rows]
    return {"workload": "loading", "config": cfg.to_dict(), "device": str(target.device),
            "dtype": target.dtype_name, "bytes": size, "rounds": rounds,
            "samples_s": samples.times, "rows": rows, "environment": environment(),
            "table": "\n".join(lines)}
