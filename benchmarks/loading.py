"""Weight-loading workload: from a checkpoint on disk to a model ready to run.

Variants, interleaved in rounds, on the same ``save_pretrained`` directory (warm page
cache, so this measures the loaders, not the disk): ``gptfn`` =
``GPTModel.from_pretrained`` (safetensors memory-mapped, tensors used in place), and
``hf`` = HF transformers' ``GPT2LMHeadModel.from_pretrained``. Each timed call ends with
one forward pass of one token, so lazily mapped weights are counted when first touched.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.harness import environment, interleaved, quick_config


def bench_loading(quick: bool, rounds: int, preset: str = "gpt2", log=print) -> dict:
    import transformers

    from gptfn import GPTConfig, GPTModel

    cfg = (quick_config(context_length=128) if quick
           else GPTConfig.from_preset(preset, dropout_rate=0.0))
    idx = torch.zeros(1, 1, dtype=torch.long)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="gptfn-load-") as tmp:
        path = Path(tmp)
        GPTModel(cfg, seed=0).save_pretrained(path)
        size = (path / "model.safetensors").stat().st_size

        def ours():
            with torch.no_grad():
                GPTModel.from_pretrained(path)(idx)

        def theirs():
            with torch.no_grad():
                transformers.GPT2LMHeadModel.from_pretrained(path)(idx)

        log(f"loading: {size / 1e6:.0f} MB checkpoint, {rounds} interleaved rounds")
        samples = interleaved({"hf": theirs, "gptfn": ours}, rounds=rounds, warmup=1)
    rows = [{"variant": n, "median_s": samples.median(n), "min_s": min(samples.times[n]),
             "max_s": max(samples.times[n]), "ratio_vs_hf": samples.ratio(n, "hf")}
            for n in ("hf", "gptfn")]
    lines = ["| variant | load + first token (s, median) | min-max | vs HF |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | "
              f"{r['ratio_vs_hf']:.2f}x |" for r in rows]
    return {"workload": "loading", "config": cfg.to_dict(), "bytes": size, "rounds": rounds,
            "samples_s": samples.times, "rows": rows, "environment": environment(),
            "table": "\n".join(lines)}
