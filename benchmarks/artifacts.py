"""Exported-artifact workload: what TorchScript, torch.export and AOTInductor artifacts cost
and how fast they run, next to eager gptfn.

The artifacts are built by the export suite (``export.build``), each verified against eager
before it is used. Forward latency (batch 1, a 128-token prompt; 32 with --quick) is timed
in interleaved rounds; size, load time, first call and per-token decode latency come from
the export suite's verification report (one run each). On the run's device and dtype
(bf16 artifacts are verified against an fp32 reference, see ``export.verify``).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Optional

import torch

from benchmarks.harness import interleaved, markdown, model_config, result, workload
from benchmarks.peers import FORMATS

_CPP = Path(__file__).resolve().parents[1] / "export" / "cpp"


@workload("artifacts")
def bench_artifacts(opts) -> dict:
    from export.aoti import load as load_aoti
    from export.build import build, check_request, load_torchscript
    from export.verify import verify
    from gptfn import GPTModel, generate, quantize

    target, quick, rounds = opts.target, opts.quick, opts.rounds
    cfg = model_config(opts, context_length=64, embed_dim=64)
    # --quick: 32 new tokens, not 16: a step is the difference of two timings, and 15 steps of
    # the tiny model were within the noise of a loaded machine (a negative step once)
    length, new_tokens, max_seq_len = (32, 32, 64) if quick else (128, 64, 256)
    model = GPTModel(cfg, seed=0).eval().to(device=target.device, dtype=target.dtype)
    idx = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    idx = idx.to(target.device)
    reports = {}
    with tempfile.TemporaryDirectory(prefix="gptfn-artifacts-") as tmp, torch.no_grad():
        paths = {"torchscript": Path(tmp) / "gpt.pt", "pt2": Path(tmp) / "gpt.pt2",
                 "aoti": Path(tmp) / "gpt_aoti.pt2"}
        check_request(cfg, paths["pt2"], max_seq_len, target.device, target.dtype)
        for kind, path in paths.items():
            print(f"artifacts: building and verifying {kind} on {target.describe()}")
            reports[kind] = build(kind, model, path, max_seq_len,
                                  lambda k, p: verify(k, p, model, max_seq_len))
        runners = {
            "eager": model,
            "torchscript": load_torchscript(paths["torchscript"]),
            "pt2": torch.export.load(str(paths["pt2"])).module(),
            "aoti": load_aoti(paths["aoti"]),
        }
        print(f"artifacts: forward latency, {rounds} interleaved rounds")
        samples = interleaved({k: (lambda r=r: r(idx)) for k, r in runners.items()},
                              rounds=rounds, warmup=2, clock=target.clock())
        # generation: every runner that decodes through a cache, against gptfn's compiled
        # decode step (what the AOTInductor package is to match); each gen(n) makes n tokens
        generators = {
            "eager": lambda n: generate(model, idx, n),
            "compiled": lambda n: generate(model, idx, n, compile=True),
            "torchscript": lambda n: runners["torchscript"].generate(idx, n, 0.0, 0, 0),
            "aoti": lambda n: runners["aoti"].generate(idx, n),
        }
        # weight formats (CPU, fp32 compute): their AOTInductor package against their
        # compiled decode step
        cpu32 = target.device.type == "cpu" and target.dtype == torch.float32
        for scheme in (("int8",) if quick else FORMATS) if cpu32 else ():
            formatted = quantize(model, scheme).eval()
            name, path = f"aoti {scheme}", Path(tmp) / f"gpt_aoti_{scheme}.pt2"
            print(f"artifacts: building and verifying the {scheme} AOTInductor package")
            reports[name] = build("aoti", formatted, path, max_seq_len,
                                  lambda k, p, m=formatted: verify(k, p, m, max_seq_len))
            package = load_aoti(path)
            generators[f"compiled {scheme}"] = (
                lambda n, m=formatted: generate(m, idx, n, compile=True))
            generators[name] = lambda n, r=package: r.generate(idx, n)
        print(f"artifacts: generating {new_tokens} tokens and 1, {rounds} interleaved rounds")
        timed = {}
        for name, gen in generators.items():
            timed[name] = lambda gen=gen: gen(new_tokens)
            timed[name + " @1"] = lambda gen=gen: gen(1)  # the prefill and first token alone
        generations = interleaved(timed, rounds=rounds, warmup=1, clock=target.clock())
        steps = {name: [(n - one) / (new_tokens - 1) for n, one in
                        zip(generations.times[name], generations.times[name + " @1"])]
                 for name in generators}  # seconds per decode step, one figure per round
        cpp_ms = (_cpp_decode_ms(paths["aoti"], idx, new_tokens, rounds, Path(tmp))
                  if target.device.type == "cpu" else None)
    rows = []
    if cpp_ms is not None:
        rows.append({"variant": "aoti (C++ runner)", "forward_ms": None, "ratio_vs_eager": None,
                     "size_mb": None, "load_s": None, "decode_ms": cpp_ms,
                     "decode_vs_compiled": statistics.median(steps["compiled"]) * 1e3 / cpp_ms})
    for name in [*runners, *(g for g in generators if g not in runners)]:
        rep = reports.get(name, {})
        rows.append({
            "variant": name,
            "forward_ms": samples.median(name) * 1e3 if name in runners else None,
            "ratio_vs_eager": samples.ratio(name, "eager") if name in runners else None,
            "size_mb": rep["size_bytes"] / 1e6 if rep else None,
            "load_s": rep.get("load_s"),
            "decode_ms": (statistics.median(steps[name]) * 1e3 if name in steps else None),
            "decode_vs_compiled": (statistics.median(
                p / v for p, v in zip(steps[_compiled_peer(name)], steps[name]))
                                   if name in steps else None),
        })
    table = markdown([("variant", "{variant}"), ("forward ms (median)", "{forward_ms:.1f}"),
                      ("vs eager", "{ratio_vs_eager:.2f}x"), ("size (MB)", "{size_mb:.1f}"),
                      ("load (s)", "{load_s:.2f}"), ("decode ms/step", "{decode_ms:.2f}"),
                      ("vs compiled step", "{decode_vs_compiled:.2f}x")], rows)
    table.append(f"\nForward: batch 1, {length} tokens (the AOTInductor package's forward "
                 "program also allocates and fills a KV cache). Decode: greedy generation of "
                 f"{new_tokens} tokens after the {length}-token prompt less that of 1 token "
                 f"(the prefill), over the {new_tokens - 1} steps between (.pt2 has no cache: "
                 "not timed). \"aoti int8\" is the package of the int8 model (and so on), set "
                 "against the compiled step of the same model. Ratios are medians of "
                 "per-round ratios. The C++ runner (export/cpp/aoti_generate.cpp, CPU only) "
                 "times its own decode steps in a second generation, one run per round after "
                 "the interleaved rounds, and is set against the compiled step's median.")
    return result("artifacts", table, target, cfg, prompt=length, new_tokens=new_tokens,
                  max_seq_len=max_seq_len, rounds=rounds, samples_s=samples.times,
                  generate_samples_s=generations.times, cpp_decode_ms=cpp_ms, reports=reports,
                  rows=rows)


def _compiled_peer(name: str) -> str:
    """The compiled decode step a generation is set against: the one of its own format."""
    scheme = name.split(" ")[-1] if " " in name else None
    return f"compiled {scheme}" if scheme in ("bf16", "fp16", "int8", "int4") else "compiled"


def _cpp_decode_ms(package: Path, idx, new_tokens: int, rounds: int,
                   tmp: Path) -> Optional[float]:
    """The C++ AOTInductor runner's ms per decode step (median of ``rounds`` runs), or None
    where it cannot be built here (no C++ compiler)."""
    import subprocess
    import sys

    from gptfn.kernels import load

    binary = tmp / "gptfn_aoti_generate"
    print("artifacts: building the C++ AOTInductor runner (export/cpp/aoti_generate.cpp)")
    built = subprocess.run(["bash", str(_CPP / "build.sh"), sys.executable, str(binary),
                            "aoti_generate.cpp"], capture_output=True, text=True)
    if built.returncode != 0:
        print(f"artifacts: the C++ runner did not build, not timed: {built.stderr[-300:]}")
        return None
    command = [str(binary), "--kernels", load(), "--time", str(package), str(new_tokens),
               *map(str, idx[0].tolist())]
    times = []
    for _ in range(rounds):
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0 or "decode_ms_per_token" not in run.stderr:
            print(f"artifacts: the C++ runner failed, not timed: {run.stderr.strip()[-300:]}")
            return None
        times.append(float(run.stderr.split("decode_ms_per_token")[-1]))
    return statistics.median(times)
