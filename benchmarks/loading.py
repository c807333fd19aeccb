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

import torch

from benchmarks.harness import interleaved, markdown, model_config, result, workload


@workload("loading")
def bench_loading(opts) -> dict:
    import transformers

    from gptfn import GPTModel

    target = opts.target
    cfg = model_config(opts, context_length=128)
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

        print(f"loading: {size / 1e6:.0f} MB checkpoint to {target.describe()}, "
              f"{opts.rounds} interleaved rounds")
        samples = interleaved({"hf": theirs, "gptfn": ours}, rounds=opts.rounds, warmup=1,
                              clock=target.clock())
    rows = [{"variant": n, "median_s": samples.median(n), "min_s": min(samples.times[n]),
             "max_s": max(samples.times[n]), "ratio_vs_hf": samples.ratio(n, "hf")}
            for n in ("hf", "gptfn")]
    table = markdown([("variant", "{variant}"),
                      ("load + first token (s, median)", "{median_s:.3f}"),
                      ("min-max", "{min_s:.3f}-{max_s:.3f}"), ("vs HF", "{ratio_vs_hf:.2f}x")],
                     rows)
    return result("loading", table, target, cfg, bytes=size, rounds=opts.rounds,
                  samples_s=samples.times, rows=rows)
