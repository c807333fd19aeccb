"""The workloads' child processes: ``python -m benchmarks.probes NAME ARG...``.

- ``compile CONFIG PROMPT NEW DEVICE DTYPE``: compile times of the decode step and the forward
  pass, and the graphs a second generation of the same shapes compiles (``compile_time``);
- ``memory CONFIG VARIANT PROMPT NEW BATCH DEVICE DTYPE``: one variant's memory after building
  its model and at its peak (``memory``);
- ``rss COMMAND...``: runs COMMAND, passes its stderr on, prints its stdout and then its peak
  RSS in KiB (``tokenizer``'s prepare). A child's ru_maxrss counts the memory of the process
  it was forked from, so the command starts from this small one, whose footprint is far
  below the figure: this module imports nothing heavy at its top.

CONFIG is a ``GPTConfig.to_dict()`` as JSON, DTYPE a torch dtype's name (``float32``). The
``compile`` and ``memory`` probes print their figures as one JSON line, last.
"""

from __future__ import annotations

import json
import sys
import time


def run_probe(label: str, name: str, *args, env=None) -> dict:
    """Probe ``name`` in a fresh process: its JSON line, or RuntimeError naming ``label``."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "benchmarks.probes", name, *map(str, args)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{label} failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _setup(config: str, device: str, dtype: str):
    import torch

    from gptfn import GPTConfig

    return GPTConfig.from_dict(json.loads(config)), torch.device(device), getattr(torch, dtype)


def compile_times(config: str, prompt: str, new: str, device: str, dtype: str) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from gptfn import GPTModel
    from gptfn.generation import generate_tokens

    cfg, device, dtype = _setup(config, device, dtype)
    prompt, new = int(prompt), int(new)
    model = GPTModel(cfg, seed=0).eval().to(device=device, dtype=dtype)
    idx = torch.randint(0, cfg.vocab_size, (1, prompt),
                        generator=torch.Generator().manual_seed(0)).to(device)
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
    return {"decode_s": first_s - second_s, "forward_s": forward_s,
            "graphs_after_warmup": graphs}


def peak_memory(config: str, variant: str, prompt: str, new: str, batch: str, device: str,
                dtype: str) -> dict:
    import torch
    import torch.nn.functional as F

    from gptfn import GPTModel
    from gptfn.generation import generate
    from gptfn.train import TrainSettings, make_optimizer

    cfg, device, dtype = _setup(config, device, dtype)
    prompt, new, batch = int(prompt), int(new), int(batch)
    cuda = device.type == "cuda"

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

    def cuda_mb(peak):
        torch.cuda.synchronize(device)
        got = (torch.cuda.max_memory_allocated(device) if peak
               else torch.cuda.memory_allocated(device))
        return got / 2**20

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
    return {"after_build_mb": built, "peak_mb": cuda_mb(True) if cuda else status("VmHWM")}


def peak_rss(command) -> int:
    import resource
    import subprocess

    r = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(r.stderr)
    print(r.stdout.strip())
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return r.returncode


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    if name == "rss":
        sys.exit(peak_rss(args))
    print(json.dumps({"compile": compile_times, "memory": peak_memory}[name](*args)))
